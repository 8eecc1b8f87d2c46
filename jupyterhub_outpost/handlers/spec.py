"""GET /openapi.json and /openapi.yaml: the API description (no credentials)"""

import json
import os

import yaml

from .base import OutpostAPIHandler

SPEC_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "openapi.yaml")


def load_spec():
    """The packaged OpenAPI description: (YAML text, JSON text)"""
    with open(SPEC_PATH, encoding="utf8") as f:
        text = f.read()
    return text, json.dumps(yaml.safe_load(text))


class OpenAPIHandler(OutpostAPIHandler):
    """Serves the description loaded at startup"""

    auth_required = False

    def get(self, extension):
        as_yaml, as_json = self.settings["openapi"]
        if extension == "yaml":
            self.set_header("Content-Type", "application/yaml")
            self.finish(as_yaml)
        else:
            self.finish(as_json)


default_handlers = [(r"/openapi\.(json|yaml)", OpenAPIHandler)]
