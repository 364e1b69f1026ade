"""The paper's data-type experiment: DPO on each preference set alone (A conversational,
B and C question answering), each judged pairwise against the base model.

    python examples/type_experiment.py                        # tiny offline world, minutes on a CPU
    python examples/type_experiment.py --preset paper --judge-model gpt-4    # OpenHermes-2.5 + MT-Bench
    python examples/type_experiment.py --preset paper --dry-run              # the plan, nothing downloaded

Writes runs/type/results.json, results.md and plot.png (see minidpo/experiment.py).
"""
import sys

from minidpo.experiment import parse, run

if __name__ == "__main__":
    run(parse(sys.argv[1:], "type"))
