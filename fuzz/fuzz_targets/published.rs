#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| allowsync_testkit::fuzzing::published(data));
