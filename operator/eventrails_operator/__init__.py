"""The eventrails operator: reconciles EventBus, Topic and Consumer resources with kopf."""
