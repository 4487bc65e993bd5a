"""Draws the three cooling schedules of coolopt for the documentation.

Left: the momentum coefficient rho_n. Middle and right, on a linear and a log
scale: the temperature factor (1 + rho_n) / (1 - rho_n), to which the temperature
is proportional at a fixed noise level (paper Eq. 19: 4 T (1 - rho) / (1 + rho) =
const). The linear schedule is a straight line on the linear scale, the friction
schedule on the log scale.

Run by `docs/conf.py` when the site is built; also runs on its own:
`python docs/_scripts/plot_schedules.py docs/_static/schedules.png`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
from matplotlib.figure import Figure

import coolopt

SCHEDULES = coolopt.schedules.COOLING_SCHEDULES
RHO_0 = 0.99
TOTAL_STEPS = 1000


def plot_schedules(path: str | Path, rho_0: float = RHO_0, total_steps: int = TOTAL_STEPS) -> Path:
  """Writes the figure to `path` (PNG) and returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  steps = jnp.arange(total_steps + 1)
  # A bare Figure draws with Agg whatever the configured backend: no display needed.
  fig = Figure(figsize=(12, 3.4), layout='constrained')
  ax_rho, ax_temp, ax_log = fig.subplots(1, 3)
  for name, make_schedule in SCHEDULES.items():
    rho = make_schedule(rho_0, total_steps)(steps)
    factor = (1 + rho) / (1 - rho)
    ax_rho.plot(steps / total_steps, rho, label=name)
    ax_temp.plot(steps / total_steps, factor, label=name)
    ax_log.plot(steps / total_steps, factor, label=name)
  ax_rho.set(xlabel='n / S', ylabel=r'$\rho_n$', title=rf'momentum coefficient, $\rho_0$ = {rho_0}')
  ax_temp.set(
    xlabel='n / S', ylabel=r'$(1 + \rho_n) / (1 - \rho_n)$', title='temperature factor (Eq. 19)'
  )
  ax_log.set(xlabel='n / S', yscale='log', title='temperature factor, log scale')
  for ax in (ax_rho, ax_temp, ax_log):
    ax.grid(alpha=0.3)
    ax.legend()
  # Written whole, then moved into place: two builds at once never read half a file.
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.png', delete=False) as file:
    fig.savefig(file, format='png', dpi=110)
  os.chmod(file.name, 0o644)  # Not the 0o600 of a temporary file.
  os.replace(file.name, path)
  return path


if __name__ == '__main__':
  plot_schedules(sys.argv[1] if len(sys.argv) > 1 else 'schedules.png')
