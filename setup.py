"""Installation of jupyterhub-outpost."""

import os

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
version_ns = {}
with open(os.path.join(here, "jupyterhub_outpost", "_version.py")) as f:
    exec(f.read(), {}, version_ns)

with open(os.path.join(here, "README.md"), encoding="utf8") as f:
    long_description = f.read()

setup(
    name="jupyterhub-outpost",
    version=version_ns["__version__"],
    description="Start JupyterHub single-user servers on systems the hub cannot reach, "
    "with any JupyterHub Spawner, for one or several hubs.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["jupyterhub_outpost", "jupyterhub_outpost.*"]),
    package_data={
        "jupyterhub_outpost": [
            "alembic.ini",
            "openapi.yaml",
            "templates/*.html",
            "alembic/*.py",
            "alembic/*.mako",
            "alembic/versions/*.py",
        ]
    },
    data_files=[
        (
            "share/jupyterhub-outpost",
            sorted(
                os.path.join("share", "jupyterhub-outpost", name)
                for name in os.listdir(os.path.join(here, "share", "jupyterhub-outpost"))
                if os.path.isfile(os.path.join(here, "share", "jupyterhub-outpost", name))
            ),
        ),
    ],
    python_requires=">=3.9",
    install_requires=[
        "jupyterhub>=5",
        "tornado>=6.1",
        "traitlets>=5.9",
        "sqlalchemy>=2.0",
        "alembic>=1.10",
        "cryptography>=41",
        "pyyaml",
        "paramiko>=3.4",
        # the library JupyterHub's /hub/metrics uses
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "pytest-timeout",
            "jupyter_server>=2",
            "requests",
            "jsonschema",
            "schemathesis>=4",
            "jupyterhub-outpostspawner==2.2.13",
            "psycopg[binary]>=3.1",
            "batchspawner==1.3.0",
            "jupyterhub-kubespawner==7.1.0",
        ],
        "kubernetes": ["jupyterhub-kubespawner>=7,<8"],
        "postgres": ["psycopg[binary]>=3.1"],
        "slurm": ["batchspawner>=1.3,<1.4"],
    },
    entry_points={
        "console_scripts": ["jupyterhub-outpost = jupyterhub_outpost.app:main"],
    },
)
