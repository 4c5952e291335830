"""One progress-bar callback for loops that report (done, total[, ...]): scoring, generation."""

from __future__ import annotations


def progress_bar(desc: str, enabled: bool, unit: str = "it", unit_scale: bool = False):
    """A callback `update(done, total, *extra)` drawing a tqdm bar, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit=unit, unit_scale=unit_scale)

    def update(done, total, *extra):
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update
