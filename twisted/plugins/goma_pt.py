from twisted.application.service import ServiceMaker

GomaPassThrough = ServiceMaker(
    "goma-pt",
    "goma_twisted.tap",
    "Forward TCP and UDP ports as listed in a Goma Gateway passThrough config.",
    "goma-pt",
)
