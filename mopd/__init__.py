"""mopd: MOPD and agentic RL post-training (README.md).

The distribution installs six top-level packages side by side: `mopd`, `rollout`, `trainer`, `envs`,
`toolbox` and `configs` (README "Installed package names"). Generic names like `envs` can belong to
another distribution, or to a folder on `sys.path`; importing anything of mopd (every package imports
`mopd.core`, so Ray workers check too) fails here, naming the culprit, rather than later with an
unrelated `ImportError` or, worse, with someone else's module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SIBLING_PACKAGES = ("rollout", "trainer", "envs", "toolbox", "configs")


def check_sibling_packages() -> None:
    """Raise ImportError if one of mopd's top-level packages resolves anywhere but next to `mopd`.

    Only finds the packages (`importlib.util.find_spec`), never runs them, so it imports nothing.
    """
    root = Path(__file__).resolve().parent.parent
    for name in SIBLING_PACKAGES:
        expected = root / name / "__init__.py"
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ImportError(f"mopd's package {name!r} is not installed (expected {expected.parent}); "
                              f"reinstall mopd (pip install -e . from the repository)")
        if spec.origin is None:  # a folder without __init__.py (often the working directory's) came first
            found = "the folder(s) " + ", ".join(spec.submodule_search_locations or [])
        else:
            found = str(Path(spec.origin).resolve())
        if found != str(expected):
            raise ImportError(
                f"the top-level package {name!r} resolves to {found}, not to mopd's {expected.parent}: another "
                f"distribution or a folder on sys.path named {name!r} shadows it. Uninstall that distribution "
                f"or run from another directory (README 'Installed package names')")


check_sibling_packages()
