"""Are P's features on whole digits better than a random P's? Linear-probe test accuracy of
the stage-3 features of pretraining runs of the digits preset, against randomly initialised
P's and 1-nearest-neighbour on raw pixels. Prints figures; asserts nothing.

    python benchmarks/digits_features.py RUN [RUN ...] [--labels 5] [--draws 5]

Each RUN is a pretraining run folder (or its model.safetensors). Features: P (stem and
stages 1-3) applied to the whole 32x32 digit, its final BN-ReLU, average-pooled to 2x2 (so
the layout survives; global pooling would discard it) and standardised; a logistic
regression (C = 0.1) fit on `--labels` training digits per class, scored on the 360 test
digits, over `--draws` random draws of the labelled digits (mean ± std).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from selfie.checkpoint import load_weights
from selfie.config import get_preset
from selfie.data.augment import channel_stats, normalize
from selfie.data.digits import load_digits
from selfie.models.resnet_v2 import ResNetV2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--labels", type=int, default=5, help="labelled digits per class")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = get_preset("digits").model
    train, test = load_digits(True), load_digits(False)
    mean, std = channel_stats(train.images)
    y, y_test = train.labels.numpy(), test.labels.numpy()
    draws = [
        np.concatenate(
            [
                np.random.default_rng(d).choice(np.where(y == k)[0], args.labels, replace=False)
                for k in range(10)
            ]
        )
        for d in range(args.draws)
    ]

    def score(fit, x: np.ndarray, x_test: np.ndarray) -> str:
        accs = [fit().fit(x[i], y[i]).score(x_test, y_test) for i in draws]
        return f"{np.mean(accs):.3f} ± {np.std(accs):.3f}"

    @torch.no_grad()
    def features(net: ResNetV2, images: torch.Tensor) -> np.ndarray:
        h = torch.relu(net.norm(net.forward_features(normalize(images, mean, std))))
        return F.adaptive_avg_pool2d(h, 2).flatten(1).numpy()

    def probe(net: ResNetV2, name: str) -> None:
        net.eval()
        scaler = StandardScaler().fit(features(net, train.images))
        x, x_test = (scaler.transform(features(net, i)) for i in (train.images, test.images))
        acc = score(lambda: LogisticRegression(C=0.1, max_iter=3000), x, x_test)
        print(f"{name}: linear probe {acc}", flush=True)

    pixels = train.images[:, 0].flatten(1).float().numpy()
    pixels_test = test.images[:, 0].flatten(1).float().numpy()
    print(f"raw pixels: 1-NN {score(lambda: KNeighborsClassifier(1), pixels, pixels_test)}")
    for seed in range(2):
        torch.manual_seed(seed)
        probe(ResNetV2(model, num_stages=3), f"random P (seed {seed})")
    for run in args.runs:
        net = ResNetV2(model, num_stages=3)
        state = load_weights(run)
        prefix = "patch_net."
        net.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if prefix in k})
        probe(net, run)


if __name__ == "__main__":
    main()
