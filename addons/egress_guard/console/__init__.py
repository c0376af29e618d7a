"""The console and admin API (HTTPS, accounts and roles) for admins, approvers and auditors:
tornado (which mitmproxy already ships), served over TLS on the proxy's event loop.

One module per concern:

- ``app``: the application factory (``make_app``), the route table, ``serve``.
- ``context``: ``ConsoleContext``, what the handlers run on (store, accounts, clocks, status),
  and the part of the store the console uses.
- ``auth``: the base handler: authentication, roles, XSRF and Origin checks, security
  headers, console events, error pages.
- ``api``: the JSON API under ``/api/v1/``. ``pages``: the HTML pages, rendered from
  ``templates/`` with tornado's autoescaping.
- ``filters``: the request-log filter, shared by the page and the API.
- ``exception_ops``: the approvers' exception workflow (actors, terms from input, the
  commands on the gateway's book, notices, JSON shapes), shared by ``exceptions_api`` (JSON
  under ``/api/v1/exceptions``; ``exceptions_openapi``, its OpenAPI document) and
  ``exceptions_pages`` (the queue, one exception, grant, active, history).
- ``sessions``, ``throttle``, ``tokens``: server-side sessions, failed-login limits, the
  bootstrap admin token. ``certs``: the console's certificate from the gateway CA.
- ``journal``: the copy of the account journal into ``console_events``.
- ``accounts``: accounts, roles and passwords (also used by the CLI).

Who may do what:

- **Authentication:** an API call carries a bearer token, either an account's token or the
  bootstrap admin token. A console page carries a session cookie, issued at login with an
  account's password.
- **Roles:** every handler declares the roles allowed per HTTP method. A handler that declares
  none refuses everyone, so a new page is closed until someone opens it on purpose. Strangers
  get 401 on every path, and the authenticated get 403 outside their roles.
- **Cookies:** sessions live on the server; the cookie only names one. It is Secure, HttpOnly
  and SameSite=Strict. It idles out after 30 minutes and ends after 12 hours, on logout, or
  when the account's password changes or the account is removed. Roles are read from the
  account at each request, so a revoked role takes effect at once.
- **CSRF:** a state-changing request that comes with a cookie must carry tornado's XSRF token,
  and its Origin, when sent, must be this console. Bearer calls carry no ambient credential and
  so have no CSRF to forge.
- **Throttling:** failed logins and failed tokens are rate-limited, per client address and per
  account name.

Every read of the request log, every login and every refusal is written to the
``console_events`` table. A query the store cannot record is not run.

Store calls and password checks run in worker threads, so the proxy's loop never waits on
them. Errors are JSON ``{"error": ...}`` on the API and a plain page in the console, never a
stack trace. All SQL goes through the store's bound parameters.

This file imports nothing: ``egress-guard account`` imports ``accounts`` and should not pay
for tornado and the store client.
"""
