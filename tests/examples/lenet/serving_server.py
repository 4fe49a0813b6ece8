"""Start Servable lenet"""

import os
import sys
from mserve import server


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    config = server.ServableStartConfig(servable_directory=servable_dir, servable_name="lenet", device_ids=(0,))
    server.start_servables(config)

    server.start_restful_server("127.0.0.1:1500")


if __name__ == "__main__":
    start()
