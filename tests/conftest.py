pytest_plugins = ["eventrails.testing"]
