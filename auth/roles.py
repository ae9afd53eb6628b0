"""Roles, ordered by what they may do: each role may do everything the roles below it may."""

from __future__ import annotations

ROLES = ("reader", "operator", "admin")  # reader: records and exports; operator: + VDIs,
# imports and tasks; admin: + users


def allows(role: str, required: str) -> bool:
    """Whether `role` may do what needs the `required` role; an unknown role may do nothing."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(required)
