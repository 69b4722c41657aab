"""DeepSpeed's pipeline topology and megatron-core's groups agree rank by rank, and a grid whose
axes are ordered differently is caught at start-up instead of training wrongly."""

from zenlm.testing.distributed import run_distributed


def _check(rank, world_size):
    import deepspeed
    from deepspeed.runtime.pipe.topology import (
        PipelineParallelGrid,
        PipeModelDataParallelTopology,
        ProcessTopology,
    )

    from zenlm.parallel.dims import ParallelDims, initialize, release_process_groups
    from zenlm.parallel.pipeline import check_pipeline_grid

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over our group
    out = {}
    for tp, pp in ((2, 2), (2, 1), (1, 2)):
        dims = initialize(ParallelDims(world_size, tp=tp, pp=pp))
        grid = PipelineParallelGrid(PipeModelDataParallelTopology(pp, tp, dims.dp))
        check_pipeline_grid(grid, dims)  # zenlm's order: raises on any disagreement
        out[(tp, pp)] = "agree"
        release_process_groups()
    # The same degrees with 'data' and 'model' swapped: a valid DeepSpeed grid, wrong for us.
    dims = initialize(ParallelDims(world_size, tp=2, pp=1))
    swapped = PipelineParallelGrid(ProcessTopology(axes=["pipe", "model", "data"], dims=[1, 2, 2]))
    try:
        check_pipeline_grid(swapped, dims)
        out["swapped"] = "not detected"
    except RuntimeError as e:
        out["swapped"] = str(e)
    release_process_groups()
    return out


def test_pipeline_grid_agrees_with_megatron_and_mismatch_is_caught():
    results = run_distributed(_check, 4, timeout_s=300)
    for rank, out in enumerate(results):
        assert out[(2, 2)] == out[(2, 1)] == out[(1, 2)] == "agree"
        if rank in (1, 2):  # ranks 0 and 3 have the same coordinates in both orders
            assert "differ" in out["swapped"], f"rank {rank}: {out['swapped']}"
    messages = [out["swapped"] for out in results]
    assert any("DeepSpeed grid" in m for m in messages), messages
