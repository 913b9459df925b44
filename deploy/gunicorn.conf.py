"""gunicorn configuration for operators.

Run the API with::

    gunicorn -c deploy/gunicorn.conf.py 'taskrunner.api.app:get_app()'

Everything (bind address, processes, threads, logging) is read from the environment by
``taskrunner.api.gunicorn_conf``; this file only re-exports it so that gunicorn can be pointed
at a plain path.
"""

from taskrunner.api.gunicorn_conf import *  # noqa
