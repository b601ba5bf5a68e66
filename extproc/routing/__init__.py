"""Where a request goes: model classification, learned and discovered model APIs, the ring."""
