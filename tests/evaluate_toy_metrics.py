"""Small random feature networks standing in for Inception and OpenCLIP in the ``evaluate`` tests
(loaded by ``--metrics tests/evaluate_toy_metrics.py:toy_metrics``). Seeded: every process that
builds them gets the same networks."""

import numpy as np
import torch

from atedm_compile.evaluate import Metrics


def toy_metrics(device) -> Metrics:
    generator = torch.Generator().manual_seed(0)

    def conv(cin, cout, kernel, stride):
        layer = torch.nn.Conv2d(cin, cout, kernel, stride)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / (cin * kernel * kernel) ** 0.5)
            layer.bias.zero_()
        return layer

    features = torch.nn.Sequential(conv(3, 8, 5, 4), torch.nn.ReLU(), conv(8, 6, 3, 2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).to(device)
    image_tower = torch.nn.Sequential(conv(3, 8, 5, 4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                      torch.nn.Flatten()).to(device)
    text_table = torch.randn(256, 8, generator=generator).to(device)  # one vector per byte

    def pixels(images):
        return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().to(device) / 255

    @torch.no_grad()
    def fid_features(images):
        return 10 * features(pixels(images)).cpu().numpy()

    @torch.no_grad()
    def clip_score(images, captions):
        image = torch.nn.functional.normalize(image_tower(pixels(images)), dim=-1)
        text = torch.stack([text_table[list(c.encode())].mean(0) for c in captions])
        return (image * torch.nn.functional.normalize(text, dim=-1)).sum(-1).cpu().numpy()

    return Metrics("toy random networks (seed 0)", fid_features, clip_score)
