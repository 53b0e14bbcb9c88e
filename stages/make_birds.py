"""Stage: write the procedural "birds with parts" dataset (CUB-200-2011 layout) into a folder.

The generator and the folder policy (refuse a non-empty folder unless overwrite) live in
pipeline/birds.py; this stage is the name that cli.py and the demo call.
"""

from __future__ import annotations

from pipeline.birds import BirdsSummary, make_birds

__all__ = ["BirdsSummary", "make_birds"]
