"""The server of example add"""

import os
import sys
from mserve import server


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))

    servable_config = server.ServableStartConfig(servable_directory=servable_dir, servable_name="add",
                                                 device_ids=(0,))
    server.start_servables(servable_configs=servable_config)

    server.start_restful_server(address="127.0.0.1:1500")


if __name__ == "__main__":
    start()
