//! TLSSigAPIv2 against the official test vectors, and its properties: what is minted verifies,
//! and any change to the usersig, key, identifier, SDKAppID or clock is rejected.

use std::io::{Read, Write};

use allowsync::usersig::{self, UsersigError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use serde_json::Value;

/// The vectors: the copy in tests/data (so a clone without shared/ works), else shared/.
fn vectors() -> Vec<Value> {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/usersig-vectors.json");
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/usersig-vectors.json");
    let text =
        std::fs::read_to_string(local).or_else(|_| std::fs::read_to_string(shared)).expect("usersig vectors");
    let v: Value = serde_json::from_str(&text).unwrap();
    let list = v["vectors"].as_array().unwrap().clone();
    assert!(!list.is_empty());
    list
}

struct Vector {
    sdkappid: u64,
    key: String,
    identifier: String,
    expire: u64,
    time: u64,
    usersig: String,
    json: Value,
}

fn parse(v: &Value) -> Vector {
    Vector {
        sdkappid: v["sdkappid"].as_u64().unwrap(),
        key: v["key"].as_str().unwrap().to_owned(),
        identifier: v["identifier"].as_str().unwrap().to_owned(),
        expire: v["expire"].as_u64().unwrap(),
        time: v["time"].as_u64().unwrap(),
        usersig: v["usersig"].as_str().unwrap().to_owned(),
        json: v["json"].clone(),
    }
}

/// The raw JSON document inside a usersig, independently of the crate's decoder.
fn raw_doc(usersig: &str) -> Value {
    let b64 = usersig.replace('*', "+").replace('-', "/").replace('_', "=");
    let z = STANDARD.decode(b64).unwrap();
    let mut json = Vec::new();
    flate2::read::ZlibDecoder::new(z.as_slice()).read_to_end(&mut json).unwrap();
    serde_json::from_slice(&json).unwrap()
}

fn encode_doc(doc: &Value) -> String {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&serde_json::to_vec(doc).unwrap()).unwrap();
    STANDARD.encode(z.finish().unwrap()).replace('+', "*").replace('/', "-").replace('=', "_")
}

#[test]
fn official_usersigs_decode_and_verify() {
    for v in vectors().iter().map(parse) {
        let doc = usersig::decode(&v.usersig).unwrap();
        assert_eq!(doc.ver, v.json["TLS.ver"].as_str().unwrap());
        assert_eq!(doc.identifier, v.json["TLS.identifier"].as_str().unwrap());
        assert_eq!(doc.sdkappid, v.json["TLS.sdkappid"].as_u64().unwrap());
        assert_eq!(doc.expire, v.json["TLS.expire"].as_u64().unwrap());
        assert_eq!(doc.time, v.json["TLS.time"].as_u64().unwrap());
        assert_eq!(doc.sig, v.json["TLS.sig"].as_str().unwrap());
        assert_eq!((doc.sdkappid, doc.expire, doc.time), (v.sdkappid, v.expire, v.time));
        // Our HMAC gives the official signature.
        assert_eq!(usersig::signature(v.sdkappid, &v.identifier, &v.key, v.expire, v.time), doc.sig);
        // Valid from its signing time to its last second, not after.
        let last = v.time + v.expire;
        for now in [v.time, last] {
            usersig::verify(&v.usersig, v.sdkappid, &v.identifier, &v.key, now).unwrap();
        }
        assert_eq!(
            usersig::verify(&v.usersig, v.sdkappid, &v.identifier, &v.key, last + 1),
            Err(UsersigError::Expired { expired_at: last, now: last + 1 })
        );
    }
}

#[test]
fn minting_reproduces_the_official_documents() {
    for v in vectors().iter().map(parse) {
        let minted = usersig::mint(v.sdkappid, &v.identifier, &v.key, v.expire, v.time);
        // Same document (key order and zlib bytes may differ, the content may not).
        assert_eq!(raw_doc(minted.expose()), v.json);
        assert_eq!(raw_doc(&v.usersig), v.json);
        let doc = usersig::decode(minted.expose()).unwrap();
        assert_eq!(doc.sig, v.json["TLS.sig"].as_str().unwrap());
        assert_eq!(doc, usersig::decode(&v.usersig).unwrap());
        usersig::verify(minted.expose(), v.sdkappid, &v.identifier, &v.key, v.time + 1).unwrap();
        // Only the substituted alphabet: safe in a query string without percent-encoding.
        assert!(minted.expose().bytes().all(|b| b.is_ascii_alphanumeric() || b"*-_".contains(&b)));
    }
}

#[test]
fn malformed_usersigs_are_typed_errors() {
    assert_eq!(usersig::decode("not base64 !"), Err(UsersigError::Base64));
    assert_eq!(usersig::decode(&STANDARD.encode(b"plain, not zlib")), Err(UsersigError::Inflate));
    assert_eq!(usersig::decode(&encode_doc(&serde_json::json!([1, 2]))), Err(UsersigError::Json));
    let v = parse(&vectors()[0]);
    let mut doc = v.json.clone();
    doc["TLS.sdkappid"] = Value::String("1400000000".into());
    assert_eq!(usersig::decode(&encode_doc(&doc)), Err(UsersigError::Field { field: "TLS.sdkappid" }));
    let mut doc = v.json.clone();
    doc.as_object_mut().unwrap().remove("TLS.sig");
    assert_eq!(usersig::decode(&encode_doc(&doc)), Err(UsersigError::Field { field: "TLS.sig" }));
    let mut doc = v.json.clone();
    doc["TLS.ver"] = Value::String("1.0".into());
    assert!(matches!(usersig::decode(&encode_doc(&doc)), Err(UsersigError::Version(_))));
    assert_eq!(usersig::decode(&"A".repeat(usersig::MAX_USERSIG_LEN + 1)), Err(UsersigError::TooLong));
}

fn identifier() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_@.-]{1,32}"
}

proptest! {
    #[test]
    fn minted_usersigs_verify(
        key in "\\PC{1,80}",
        id in identifier(),
        app in any::<u64>(),
        expire in 1u64..=400 * 86_400,
        now in 0u64..=4_000_000_000,
        after in 0u64..=400 * 86_400,
    ) {
        let sig = usersig::mint(app, &id, &key, expire, now);
        let at = now + after.min(expire);
        let doc = usersig::verify(sig.expose(), app, &id, &key, at).unwrap();
        prop_assert_eq!((doc.sdkappid, doc.expire, doc.time), (app, expire, now));
        prop_assert_eq!(doc.identifier, id);
        let shown = format!("{:?}{}", sig, sig);
        prop_assert!(!shown.contains(sig.expose()));
    }

    #[test]
    fn altered_usersigs_are_rejected(
        key in "[ -~]{1,64}",
        other_key in "[ -~]{1,64}",
        id in identifier(),
        other_id in identifier(),
        app in 1u64..=u32::MAX as u64,
        expire in 1u64..=86_400,
        now in 1_000_000u64..=2_000_000_000,
        flip in any::<prop::sample::Index>(),
    ) {
        let sig = usersig::mint(app, &id, &key, expire, now);
        // A tampered signature: one byte of the HMAC changed, re-encoded properly.
        let mut doc = raw_doc(sig.expose());
        let mut mac = STANDARD.decode(doc["TLS.sig"].as_str().unwrap()).unwrap();
        let i = flip.index(mac.len());
        mac[i] ^= 1;
        doc["TLS.sig"] = Value::String(STANDARD.encode(&mac));
        prop_assert_eq!(usersig::verify(&encode_doc(&doc), app, &id, &key, now), Err(UsersigError::BadSignature));
        // A tampered field with the original signature.
        let mut doc = raw_doc(sig.expose());
        doc["TLS.expire"] = Value::from(expire + 1);
        prop_assert_eq!(usersig::verify(&encode_doc(&doc), app, &id, &key, now), Err(UsersigError::BadSignature));
        // Another key.
        if other_key != key {
            prop_assert_eq!(usersig::verify(sig.expose(), app, &id, &other_key, now), Err(UsersigError::BadSignature));
        }
        // Another identifier or SDKAppID.
        if other_id != id {
            let is_mismatch = matches!(usersig::verify(sig.expose(), app, &other_id, &key, now), Err(UsersigError::IdentifierMismatch { .. }));
            prop_assert!(is_mismatch);
        }
        let is_app_mismatch = matches!(usersig::verify(sig.expose(), app + 1, &id, &key, now), Err(UsersigError::SdkappidMismatch { .. }));
        prop_assert!(is_app_mismatch);
        // Expired.
        prop_assert_eq!(
            usersig::verify(sig.expose(), app, &id, &key, now + expire + 1),
            Err(UsersigError::Expired { expired_at: now + expire, now: now + expire + 1 })
        );
    }
}
