"""The built-in synthetic world: a plugin the core never imports (only names it in spec strings).

    from chatsmith.world import World
    World(seed=0).corpus() / .sft() / .preferences() / .prompts() / .eval_sets()
    chatsmith world export data/world          # the same as files
    chatsmith demo                             # the whole journey on it

Modules: `generator` (the `World` class, built from `corpus`, `conversations`, `preferences` and `suite`),
`text` (sentence pools and helpers), `facts` (the facts), `judge` (the programmatic judge and reward,
reached by the core through `--judge world` / `--reward world`), `export` (`chatsmith world export`),
`demo` (`chatsmith demo`, its profiles and targets) and `progress` (the demo's pipeline progress).
"""

from __future__ import annotations

from chatsmith.world.export import WorldExportConfig, export_world
from chatsmith.world.generator import World

__all__ = ["World", "WorldExportConfig", "export_world"]
