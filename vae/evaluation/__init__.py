"""What a trained code is worth: per-epoch latent diagnostics (``diagnostics``) and scores against
ground-truth factors of variation (``factor_metrics``)."""
