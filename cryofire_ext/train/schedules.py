"""Schedules as pure functions of the number of images seen (so a resumed run follows the same path)."""

from __future__ import annotations


def learning_rate(config, images_seen: int) -> float:
    """Linear warm-up from lr/10 to `lr` over `lr_warmup_images`, then constant."""
    if config.lr_warmup_images <= 0 or images_seen >= config.lr_warmup_images:
        return config.lr
    f = images_seen / config.lr_warmup_images
    return config.lr * (0.1 + 0.9 * f)


def march_radius(config, images_seen: int, start: float | None = None) -> float:
    """Frequency-marching radius (units of Nyquist): `start` -> 1 linearly over `march_images`."""
    r0 = config.march_start if start is None else start
    if config.march_images <= 0:
        return 1.0
    return min(1.0, r0 + (1.0 - r0) * images_seen / config.march_images)


def pose_only(config, images_seen: int) -> bool:
    """True while z is replaced by random noise (the pose-only phase); always False for zdim 0."""
    return config.zdim > 0 and images_seen < config.pose_only_images


def distill_weight(config, images_seen: int) -> float:
    """Weight of the searched-pose distillation term: 1 for `distill_images`, then linear to 0."""
    if config.warm_start != "search" or config.distill_images <= 0:
        return 0.0
    d = config.distill_images
    if images_seen < d:
        return 1.0
    return max(0.0, 1.0 - (images_seen - d) / d)
