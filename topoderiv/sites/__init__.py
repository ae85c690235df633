"""Sites: one growth protocol for linear, token, convolution and transformer-block insertions.

See :mod:`topoderiv.sites.base` for the protocol, :mod:`topoderiv.sites.capture` for how states
and costates are read (hooks), and one module per kind.
"""
from .base import (  # noqa: F401
    KINDS,
    Site,
    SiteSpec,
    candidate_points,
    check_growable,
    check_point,
    check_points,
    declare,
    depth,
    reference_param,
    register_kind,
    site_at,
    site_specs,
    sites,
)
from . import linear  # noqa: F401,E402  (registers the kinds)
from . import transformer  # noqa: F401,E402  (registers the transformer kinds)
from . import conv  # noqa: F401,E402  (registers the conv kind)

__all__ = ["KINDS", "Site", "SiteSpec", "candidate_points", "check_growable", "check_point", "check_points", "declare", "depth",
           "reference_param", "register_kind", "site_at", "site_specs", "sites"]
