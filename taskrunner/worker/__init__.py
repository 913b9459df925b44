"""Workers: claim ready tasks and queued webhooks from PostgreSQL and deliver them.

``main.run_worker`` is the process entry point, ``worker.Worker`` the claim/deliver loop,
``webhooks`` the one place that builds webhook requests and reads their answers,
``retrypolicy`` the backoff between attempts, ``outcomes`` the group commit of results.
"""
