from conftest import create_batch, statuses, task_spec


def test_chain_runs(conn):
    create_batch(conn, [task_spec("a"), task_spec("b", deps=["a"])])
    assert statuses(conn) == {"a": "pending", "b": "waiting"}
