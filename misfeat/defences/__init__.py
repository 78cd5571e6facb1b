"""The in-training defence comparison on the organism (issue 15; docs/defences.md).

``grid``: the arms (none, KL, LDIFS, steering, CAFT, inoculation, interleaving), the two
fine-tunes per arm and seed, the four criteria, the table and the figure; ``screening``: the
projection-difference screening experiment (8 datasets, per-sample AUROC, top/random/bottom-k).

    from misfeat.defences import GridConfig, run_grid
    result = run_grid(GridConfig(seeds=(0, 1)), out_dir="runs/defences")
"""

from misfeat.defences.grid import (
    DEFENCES,
    Arm,
    GridConfig,
    GridResult,
    SeedContext,
    arms,
    plot_grid,
    prepare,
    run_arm,
    run_grid,
    save_grid,
    train,
)

__all__ = ["DEFENCES", "Arm", "GridConfig", "GridResult", "SeedContext", "arms", "plot_grid", "prepare", "run_arm",
           "run_grid", "save_grid", "train"]
