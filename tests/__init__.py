"""The test suite is a package: modules import shared helpers as ``tests.<dir>.<module>`` (see tests/helpers.py).

pytest runs from the repository root (`pyproject.toml` puts it on sys.path: ``pythonpath = ["."]``). Scripts that
tests start as subprocesses (tests/distributed/*_worker.py, fault_driver.py) import only ``reformer_dist``; a
subprocess that needs ``tests.*`` gets the root on PYTHONPATH from ``tests.distributed.train_launcher.clean_env``.
"""
