"""The HTTP API: a thin Falcon app that validates input and calls one SQL function per request.

``app.create_app(config, pool)`` builds it; gunicorn loads ``app.get_app()`` with the settings
in ``gunicorn_conf``.
"""
