"""GroupNorm with a statistics pass that reads channels-last activations in order."""

import torch
import torch.nn.functional as F
from torch import nn


def group_norm_per_channel_stats(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), its statistics taken per channel first.

    x: (n, c, *spatial). A group's elements lie C apart in channels-last memory,
    so reducing over (group channels, space) at once reads with that stride;
    reducing over space per channel reads whole rows of c. The group's mean and
    variance then follow from its channels' (equal counts): mean of the means,
    and mean of the variances plus the variance of the means.
    """
    n, c = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    var_c, mean_c = torch.var_mean(x.float(), dim=spatial, correction=0)     # (n, c), float32
    mean_c, var_c = mean_c.view(n, groups, -1), var_c.view(n, groups, -1)    # (n, groups, c / groups)
    mean = mean_c.mean(-1, keepdim=True)
    var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.float().view(groups, -1)           # (n, groups, c / groups)
    shift = bias.float().view(groups, -1) - mean * scale
    per_channel = (n, c) + (1,) * len(spatial)
    return (x.float() * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys).

    With `per_channel_stats` (set by UNet3D.to_channels_last) it takes the
    statistics per channel first: the same values, read in channels-last order.
    """
    per_channel_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel_stats:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm_per_channel_stats(x, self.num_groups, self.weight, self.bias, self.eps)
