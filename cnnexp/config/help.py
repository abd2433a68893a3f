"""`cnnexp --help`: the config groups and their options, read from the config
search path at help time, so a group or option added anywhere (conf/, a plugin,
hydra.searchpath) is listed without editing the help text.

Hydra's own `$APP_CONFIG_GROUPS` also lists the schema nodes of
cnnexp/config/schema.py (`sgd_schema`, ...), which are not options a user picks;
conf/hydra/help/cnnexp.yaml calls this resolver instead.
"""

from __future__ import annotations

from hydra.core.object_type import ObjectType
from omegaconf import DictConfig

# Hydra's own groups worth knowing when running cnnexp; the rest are in --hydra-help.
HYDRA_GROUPS_SHOWN = ("hydra/launcher", "hydra/sweeper")


def is_schema(option: str) -> bool:
    return option.endswith("_schema") or option == "schema"


def list_groups(loader, parent: str = "") -> list[str]:
    """Every group with at least one option, depth first (hydra/launcher, ...).
    `loader` is Hydra's config loader or a config repository: both list options."""
    groups = []
    for name in loader.get_group_options(parent, ObjectType.GROUP):
        group = f"{parent}/{name}" if parent else name
        if is_schema(name):
            continue
        if any(not is_schema(o) for o in loader.get_group_options(group, ObjectType.CONFIG)):
            groups.append(group)
        groups += list_groups(loader, group)
    return groups


def _with_searchpath(loader, root: DictConfig):
    """A repository that also sees the folders of hydra.searchpath (a user's own
    groups); Hydra's loader only adds them while composing. Falls back to the
    loader if Hydra's internals differ."""
    paths = list(root.hydra.get("searchpath") or []) if "hydra" in root else []
    if not paths:
        return loader
    try:
        import copy

        from hydra._internal.config_repository import ConfigRepository

        search_path = copy.deepcopy(loader.get_search_path())
        schema = search_path.get_path().pop(-1)
        for path in paths:
            search_path.append(provider="hydra.searchpath", path=path)
        search_path.get_path().append(schema)
        repo = ConfigRepository(config_search_path=search_path)
        return repo
    except Exception:
        return loader


def config_groups_text(_root_: DictConfig) -> str:
    """One line per group: its options, the default marked with *; a group with
    no default is added with +group=option."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return "(the config groups are listed when cnnexp runs with --help)"
    loader = _with_searchpath(GlobalHydra.instance().config_loader(), _root_)
    choices = dict(_root_.hydra.runtime.choices) if "runtime" in _root_.get("hydra", {}) else {}
    wanted = [g for g in list_groups(loader) if not g.startswith("hydra") or g in HYDRA_GROUPS_SHOWN]
    wanted.sort(key=lambda g: (g.startswith("hydra"), g))
    width = max((len(g) for g in wanted), default=0) + 3
    lines = []
    for group in wanted:
        options = sorted(o for o in loader.get_group_options(group, ObjectType.CONFIG) if not is_schema(o))
        chosen = choices.get(group)
        shown = ", ".join(f"{o}*" if o == chosen else o for o in options)
        how = "" if group in choices else f"   (add with +{group}=NAME)"
        lines.append(f"  {group:<{width}}{shown}{how}")
    return "\n".join(lines)
