"""Credits: the budgets a hub's credit service may charge, per hub and user.

Pure functions without I/O, on the ``credits`` setting::

    {
        "credits": {name: {...}},          # the budgets, any JSON object each
        "hubs": {rule name: {"hub": pattern, "credits": [names], "weight": N,
                             "creditsOverride": {name: {key: value}}}},
        "users": {rule name: {"hub": pattern, "authentication": {...}, "weight": N,
                              "forbidden": bool, "credits": [names],
                              "creditsOverride": {name: {key: value}}}},
    }

Rules are matched as the flavor rules are (:mod:`jupyterhub_outpost.flavors`):
patterns are regular expressions, globs or literals, the matching rule with
the highest weight applies. Without ``hubs`` rules every hub may use every
credit; with rules, a hub that none matches may use none. A user rule may
narrow the hub's credits (``credits``), change keys of them
(``creditsOverride``), or forbid all (``forbidden``).
"""

import copy

from .flavors import best_rule, match_pattern, normal_rules, user_rule


def check(config):
    """Raise ValueError when the ``credits`` setting has the wrong shape"""
    if not isinstance(config, dict):
        raise ValueError("credits must be an object with 'credits', 'hubs' and 'users'")
    unknown = set(config) - {"credits", "hubs", "users"}
    if unknown:
        raise ValueError(f"credits has unknown keys: {', '.join(sorted(unknown))}")
    budgets = config.get("credits") or {}
    if not isinstance(budgets, dict) or not all(isinstance(v, dict) for v in budgets.values()):
        raise ValueError("credits.credits must map names to objects")
    for section in ("hubs", "users"):
        for rule in normal_rules(config.get(section)):
            for name in rule.get("credits") or []:
                if name not in budgets:
                    raise ValueError(f"credits.{section}: rule {rule.get('name')!r} names "
                                     f"unknown credit {name!r}")  # fmt: skip
            overrides = rule.get("creditsOverride") or {}
            if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
                raise ValueError(f"credits.{section}: creditsOverride of rule {rule.get('name')!r} "
                                 "must map credit names to objects")  # fmt: skip


def _apply(budgets, names, overrides):
    resolved = {}
    for name in names:
        credit = copy.deepcopy(budgets[name])
        credit.update(copy.deepcopy((overrides or {}).get(name, {})))
        resolved[name] = credit
    return resolved


def hub_credits(config, hub):
    """``{name: credit}`` that hub ``hub`` may use, with its overrides applied"""
    budgets = (config or {}).get("credits") or {}
    rules = normal_rules((config or {}).get("hubs"))
    if not rules:
        return _apply(budgets, list(budgets), {})
    rule = best_rule(r for r in rules if match_pattern(r.get("hub", r.get("name", "")), hub))
    if rule is None:
        return {}
    names = rule.get("credits")
    return _apply(budgets, [n for n in budgets if names is None or n in names],
                  rule.get("creditsOverride"))  # fmt: skip


def user_credits(config, hub, authentication):
    """``{name: credit}`` one user of hub ``hub`` may use ({} when forbidden)"""
    credits = hub_credits(config, hub)
    rule = user_rule((config or {}).get("users"), hub, authentication or {})
    if rule is None:
        return credits
    if rule.get("forbidden", False):
        return {}
    if "credits" in rule:
        credits = {n: c for n, c in credits.items() if n in (rule["credits"] or [])}
    for name, override in (rule.get("creditsOverride") or {}).items():
        if name in credits:
            credits[name].update(copy.deepcopy(override))
    return credits
