"""taskrunner: a PostgreSQL-centric service that runs DAGs of webhook tasks.

Layout: ``sql/`` holds the state machine (migrations + dumped schema); ``taskrunner.db``
is the one place that opens connections and maps database errors; ``taskrunner.api`` is
the Falcon HTTP layer; ``taskrunner.worker`` claims tasks and delivers webhooks;
``taskrunner.cli`` wires them into the ``taskrunner`` command.
"""

__version__ = "0.1.0"
