"""The device listing's capabilities messages: built once per capabilities object,
rebuilt for a new one, dropped when two listings did not use them."""

from __future__ import annotations

from coordinator.control import CapabilitiesCache
from edgefarm.domain import DeviceCapabilities
from protos.convert import capabilities_from_pb


def _caps(device: str) -> DeviceCapabilities:
    return DeviceCapabilities(device_id=device, hostname=device, backends={"noop": "1"})


def test_one_message_per_capabilities_object() -> None:
    cache, caps = CapabilitiesCache(), _caps("d1")
    cache.new_listing()
    first = cache.message(caps)
    assert capabilities_from_pb(first) == caps
    assert cache.message(caps) is first  # the same listing
    cache.new_listing()
    assert cache.message(caps) is first  # the next listing still has it
    equal = _caps("d1")  # an equal but new object (a re-registration): its own message
    assert cache.message(equal) is not first
    assert capabilities_from_pb(cache.message(equal)) == equal


def test_entries_unused_for_two_listings_are_dropped() -> None:
    cache = CapabilitiesCache()
    kept, gone = _caps("kept"), _caps("gone")
    cache.new_listing()
    kept_msg, gone_msg = cache.message(kept), cache.message(gone)
    cache.new_listing()
    assert cache.message(kept) is kept_msg
    cache.new_listing()
    assert cache.message(kept) is kept_msg
    assert cache.message(gone) is not gone_msg  # dropped: built again
    assert len(cache) <= 3  # at most two listings' worth
