"""A tiny BatchNorm CNN (stem, two residual blocks, head: the units convention of boa.vision.models) and smooth
test images, shared by the vision tests."""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


def smooth_images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Spatially correlated images, each channel standardised (as normalised photographs roughly are)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, size + 4, size + 4, generator=g), 5, 1, 0)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
    return (x - mean) / var.sqrt()


def tiny_cnn() -> nn.Sequential:
    """3x12x12 images, 10 classes, BN running statistics of smooth_images (as after training); eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        Block(8, 16, 2),
        Block(16, 24, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)),
    )
    model.train()
    with torch.no_grad():
        for seed in range(30):
            model(smooth_images(64, seed=100 + seed))
    return model.eval()
