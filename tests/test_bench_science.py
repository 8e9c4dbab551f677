"""The science benchmark's sweep: dip_sbd at the CPU scale, with a collapse rule that fits its epochs."""
from bench.science import RULE, SCALE, sweep_file
from sweeps.spec import load_sweep, stopping_notes


def test_the_benchmark_sweep_is_dip_sbd_at_its_scale(tmp_path):
    sweep = load_sweep(str(sweep_file(tmp_path)), changes={"budget.max_epochs": 20})
    shipped = load_sweep("dip_sbd")
    assert sweep.space.names == shipped.space.names and sweep.spec.enqueue == shipped.spec.enqueue
    assert sweep.objectives == shipped.objectives and sweep.spec.constraints == shipped.spec.constraints
    data, model = sweep.experiment.data, sweep.experiment.model
    assert (data.size, data.phantom.subjects, data.phantom.vary, model.z_dim) == (32, 96, "tumour", 16)
    assert round(data.val_fraction * data.phantom.subjects) == 24 and SCALE["data.size"] == 32
    assert sweep.spec.early_stop.collapse.model_dump(exclude_none=True) == RULE
    assert stopping_notes(sweep) == []  # grace + patience fit in 20 epochs
