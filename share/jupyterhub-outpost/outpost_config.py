# Example configuration of jupyterhub-outpost; runs as is:
#
#     jupyterhub-outpost -f outpost_config.py
#
# Every setting is documented in `jupyterhub-outpost --help-all`, and
# `jupyterhub-outpost --generate-config -f full_config.py` writes them all.
import os

c = get_config()  # noqa: F821

# Where the API listens. The hub's request_url is http://<this host>:8080/services/
c.JupyterHubOutpost.ip = "127.0.0.1"
c.JupyterHubOutpost.port = 8080
# c.JupyterHubOutpost.base_url = "/outpost/"

# Records of the running servers. SQLite in the working directory by default;
# PostgreSQL for several Outpost processes:
# c.JupyterHubOutpost.db_url = "postgresql+psycopg://outpost@db.example.org/outpost"
c.JupyterHubOutpost.db_url = "sqlite:///jupyterhub_outpost.sqlite"

# The hubs that may use this Outpost, name -> password. Keep passwords out of
# this file: set OUTPOST_HUB_CREDENTIALS='{"my-hub": "..."}' in the
# environment (or OUTPOST_HUB_CREDENTIALS_FILE to a JSON file). This example
# falls back to one demo hub so that it starts as is.
if not (os.environ.get("OUTPOST_HUB_CREDENTIALS") or os.environ.get("OUTPOST_HUB_CREDENTIALS_FILE")):
    c.JupyterHubOutpost.hub_credentials = {"demo-hub": "change-me"}

# The Spawner that starts the servers, configured as in jupyterhub_config.py.
# LocalProcessSpawner runs each server as the system user of the hub's user
# name (the Outpost must run as root); SimpleLocalProcessSpawner runs them all
# as the Outpost's own user, which suits a demo.
c.JupyterHubOutpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "/tmp/outpost-{username}"
c.Spawner.start_timeout = 60
# A stop answers within the hub's request timeout (30 s): SIGINT, SIGTERM
# after 10 s, SIGKILL 5 s later (JupyterHub's defaults wait 30 + 30 s)
c.Spawner.interrupt_timeout = 10
c.Spawner.term_timeout = 5
c.Spawner.kill_timeout = 5

# Which per-start overrides ("misc") a hub may send. By default only the
# OutpostSpawner's own network settings (ip, port, internal_ssl, ...) are
# accepted; other traits of the Spawner are refused, unknown ones ignored.
# c.JupyterHubOutpost.allowed_overrides = ["mem_limit"]

# Which local account a hub user's server runs as (default: the hub's user
# name). Accounts below uid 1000, root and nobody never run servers.
# c.JupyterHubOutpost.account_name_template = "{hub}-{username}"
# c.JupyterHubOutpost.min_account_uid = 1000
