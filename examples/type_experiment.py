"""The paper's data-type experiment: DPO on each preference set alone (A conversational,
B and C question answering), each judged pairwise against the base model (and, on the tiny preset,
scored alone).

    python examples/type_experiment.py                            # tiny offline world, minutes on a CPU
    python examples/type_experiment.py --seeds 3 --world-seed 1   # seed spread, on another world
    python examples/type_experiment.py --split dev --epochs 3     # tune on the dev questions
    python examples/type_experiment.py --preset paper --dry-run   # the paper's plan, nothing downloaded
    python examples/type_experiment.py --preset paper --judge-model gpt-4     # OpenHermes-2.5 + MT-Bench

Every `train` flag (--beta, --lr, --lora-r, --epochs, ...) applies over the preset's recipe; `--help`
lists them all. Writes runs/type/results.json, results.md, plot.png and curves.png; stage outputs
are kept under runs/cache, keyed by their inputs (see minidpo/experiment.py).
"""
import sys

from minidpo.experiment import parse, run

if __name__ == "__main__":
    run(parse(sys.argv[1:], "type"))
