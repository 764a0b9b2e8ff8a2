"""The web console (issue 19): approvals, live sessions, recordings and evidence in a browser.

Served by the gateway's HTTP API (bastion/http/api.py registers :func:`bastion.console.routes.add_routes`)
with the same identities and roles: the session cookie holds the OIDC access token the
issuer gave the browser, verified on every request exactly like an API bearer token.
See docs/console.md. This module stays import-light: bastion.config imports its settings.
"""
