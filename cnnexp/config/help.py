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


class SearchpathOptions:
    """Group options as the command sees them, hydra.searchpath's folders (a
    user's own groups) included: Hydra's loader adds those folders only while
    composing, but its public `get_group_options` adds them when given the
    primary config's name and the command's overrides."""

    def __init__(self, loader, config_name: str | None, overrides: list[str]):
        self.loader, self.config_name, self.overrides = loader, config_name, overrides

    def get_group_options(self, group: str, results_filter: ObjectType) -> list[str]:
        try:
            return self.loader.get_group_options(group, results_filter, config_name=self.config_name,
                                                 overrides=self.overrides)
        except Exception:  # a searchpath Hydra cannot read: list what the loader sees without it
            return self.loader.get_group_options(group, results_filter)


def _with_searchpath(loader, root: DictConfig):
    """The loader, seeing hydra.searchpath's folders when the command has any."""
    hydra_cfg = root.get("hydra") or {}
    if not hydra_cfg.get("searchpath") or "job" not in hydra_cfg:
        return loader
    overrides = [*hydra_cfg.get("overrides", {}).get("hydra", []), *hydra_cfg.get("overrides", {}).get("task", [])]
    return SearchpathOptions(loader, hydra_cfg.job.get("config_name"), list(overrides))


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
