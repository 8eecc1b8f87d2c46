"""Flavors: resource templates, who may use them, and usage arithmetic.

Pure functions without I/O. The application holds the configuration
(``flavors``, ``hubs`` and ``users`` rules); the database counts servers.

Matching: a pattern is tried as a regular expression (full match), then as
a glob, then as a literal; a list of literals matches any of them. A field
whose value is a list (such as ``groups``) matches if any element does.
"""

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

from .errors import OutpostError

FLAVOR_KEYS = ("display_name", "description", "weight", "max", "maxPerUser", "runtime")


class FlavorError(OutpostError):
    """A start cannot use the flavor it asked for (message says why)"""

    status_code = 419


@dataclass
class FlavorDecision:
    """The flavors one user of one hub may use, and the limits that apply"""

    allowed: dict = field(default_factory=dict)  # name -> flavor definition
    forbidden: bool = False


def _regex_match(pattern, value):
    try:
        return re.fullmatch(pattern, value) is not None
    except re.error:
        return None


def match_pattern(pattern, value):
    """True if ``value`` matches ``pattern`` (regex, then glob, then literal).

    ``pattern`` may be a list of literals; ``value`` may be a list (any
    element matching is enough).
    """
    if isinstance(value, (list, tuple, set)):
        return any(match_pattern(pattern, v) for v in value)
    if isinstance(pattern, (list, tuple, set)):
        return any(str(p) == str(value) for p in pattern)
    if value is None:
        return False
    pattern, value = str(pattern), str(value)
    if _regex_match(pattern, value):
        return True
    if fnmatch.fnmatchcase(value, pattern):
        return True
    return pattern == value


def authentication_matches(rule_fields, authentication):
    """True if every field of the rule matches the authentication object"""
    return all(
        key in authentication and match_pattern(pattern, authentication[key])
        for key, pattern in (rule_fields or {}).items()
    )


def normal_rules(rules):
    """Normalise rules given as a dict (name -> rule) or a list"""
    if isinstance(rules, dict):
        return [dict(rule, name=name) for name, rule in rules.items()]
    return [dict(rule) for rule in rules or []]


def best_rule(candidates):
    """The matching rule with the highest weight (first one on ties)"""
    best = None
    for rule in candidates:
        if best is None or rule.get("weight", 0) > best.get("weight", 0):
            best = rule
    return best


def hub_flavor_names(flavors, hub_rules, hub):
    """Names of the flavors ``hub`` may use under the ``hubs`` rules.

    Without hub rules every hub may use every flavor; with rules, a hub no
    rule matches may use none.
    """
    rules = normal_rules(hub_rules)
    if not rules:
        return list(flavors)
    matching = [r for r in rules if match_pattern(r.get("hub", r.get("name", "")), hub)]
    rule = best_rule(matching)
    if rule is None:
        return []
    names = rule.get("flavors")
    return [n for n in flavors if names is None or n in names]


def user_rule(user_rules, hub, authentication):
    """The best ``users`` rule for this user of this hub, or None"""
    matching = []
    for rule in normal_rules(user_rules):
        if "hub" in rule and not match_pattern(rule["hub"], hub):
            continue
        matched = authentication_matches(rule.get("authentication"), authentication or {})
        if rule.get("negate_authentication", False):
            matched = not matched
        if matched:
            matching.append(rule)
    return best_rule(matching)


def decide(flavors, hub_rules, user_rules, hub, authentication):
    """The flavors this user of this hub may use"""
    names = hub_flavor_names(flavors, hub_rules, hub)
    rule = user_rule(user_rules, hub, authentication)
    if rule is not None:
        if rule.get("forbidden", False):
            return FlavorDecision(forbidden=True)
        if "flavors" in rule:
            names = [n for n in names if n in rule["flavors"]]
    return FlavorDecision(allowed={n: flavors[n] for n in names})


def sorted_names(flavors):
    """Flavor names by weight (highest first), then name"""
    return sorted(flavors, key=lambda n: (-flavors[n].get("weight", 0), n))


def limit(value):
    """A limit as an int, or None when unlimited (absent, None or negative)"""
    if value is None:
        return None
    value = int(value)
    return None if value < 0 else value


def runtime_delta(flavor) -> Optional[timedelta]:
    """The flavor's lifetime per server, or None when unlimited"""
    runtime = flavor.get("runtime") or {}
    delta = timedelta(
        days=runtime.get("days", 0),
        hours=runtime.get("hours", 0),
        minutes=runtime.get("minutes", 0),
        seconds=runtime.get("seconds", 0),
    )
    return delta if delta.total_seconds() > 0 else None


def check_start(name, flavors, decision, default_flavor=""):
    """The flavor a start uses (name, definition), or FlavorError saying why not.

    Limits are checked later, where servers are counted.
    """
    if not flavors:
        return None, None
    if decision.forbidden:
        raise FlavorError("You are not allowed to start servers on this system")
    name = name or default_flavor
    allowed = sorted_names(decision.allowed)
    if not name:
        raise FlavorError(
            "Choose a flavor; you may use: " + (", ".join(allowed) or "none")
        )
    if name not in decision.allowed:
        raise FlavorError(
            f"Flavor {name!r} is not available to you; you may use: "
            + (", ".join(allowed) or "none")
        )
    return name, decision.allowed[name]


def limit_error(name, flavor, current, user_current, user_total, global_max_per_user):
    """A message naming the limit a new server of ``name`` would exceed, or None"""
    display = flavor.get("display_name") or name
    max_total = limit(flavor.get("max"))
    if max_total is not None and current >= max_total:
        return f"Flavor {display}: {current} of {max_total} in use"
    max_user = limit(flavor.get("maxPerUser"))
    if max_user is not None and user_current >= max_user:
        return f"Flavor {display}: you use {user_current} of {max_user} allowed per user"
    max_global = limit(global_max_per_user)
    if max_global is not None and user_total >= max_global:
        return f"You run {user_total} of {max_global} servers allowed per user"
    return None


def usage_model(flavors, counts):
    """The usage object of ``GET /flavors`` and the hub update.

    ``counts``: flavor name -> servers of that flavor running now.
    """
    model = {}
    for name in sorted_names(flavors):
        flavor = flavors[name]
        entry = {key: flavor[key] for key in FLAVOR_KEYS if key in flavor}
        entry.setdefault("display_name", name)
        entry.setdefault("description", "")
        entry.setdefault("weight", 0)
        entry["max"] = -1 if limit(flavor.get("max")) is None else int(flavor["max"])
        entry["maxPerUser"] = (
            -1 if limit(flavor.get("maxPerUser")) is None else int(flavor["maxPerUser"])
        )
        entry.setdefault("runtime", {})
        entry["current"] = counts.get(name, 0)
        model[name] = entry
    return model


def apply_resources(spawner, name, flavor):
    """Default ``apply_flavor_hook``: set ``resources`` keys that are Spawner traits"""
    for key, value in (flavor.get("resources") or {}).items():
        if spawner.has_trait(key):
            setattr(spawner, key, value)
        else:
            spawner.log.debug("Flavor %s: %s is not a trait of %s", name, key, type(spawner).__name__)

