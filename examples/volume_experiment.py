"""The paper's data-volume experiment: DPO on nested 20/40/60/80/100% subsets of three pooled
preference sets, each judged pairwise against the base model.

    python examples/volume_experiment.py                      # tiny offline world, minutes on a CPU
    python examples/volume_experiment.py --preset paper --judge-model gpt-4  # OpenHermes-2.5 + MT-Bench
    python examples/volume_experiment.py --preset paper --dry-run            # the plan, nothing downloaded

Writes runs/volume/results.json, results.md and plot.png (see minidpo/experiment.py).
"""
import sys

from minidpo.experiment import parse, run

if __name__ == "__main__":
    run(parse(sys.argv[1:], "volume"))
