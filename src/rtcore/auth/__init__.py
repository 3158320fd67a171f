"""Ready-made ``@app.authenticate`` hooks.

:func:`jwt` verifies JSON Web Tokens (on PyJWT, the ``jwt`` extra:
``pip install 'rtcore[jwt]'``) and turns their claims into a
:class:`~rtcore.Principal`::

    app.authenticate(rtcore.auth.jwt(key=SECRET, algorithms=["HS256"], audience="game"))

Layer 4 (beside :mod:`rtcore.server`): it builds on the engine's
:class:`~rtcore.engine.app.Principal` and is used by applications; nothing
below imports it, and PyJWT is imported only when :func:`jwt` is called.
"""

from __future__ import annotations

from .jwt_auth import JwtAuth, jwt

__all__ = ["JwtAuth", "jwt"]
