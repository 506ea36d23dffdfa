#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_coordinator::fuzzing::enrol_request(data));
