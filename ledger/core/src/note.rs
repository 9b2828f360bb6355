//! C2SP signed notes with Ed25519 (signature type 0x01): keys, verifier keys (`vkey`), key IDs,
//! signing and verification.
//!
//! A note is UTF-8 text of one or more LF-terminated lines, a blank line, then one signature line
//! per key: `— <name> <base64(key id (4 bytes, big-endian) || signature)>`. The signed bytes are the
//! text including its final LF. Key ID = `SHA-256(name || 0x0A || 0x01 || public key)[:4]`.
//!
//! Verification follows the spec's rules: signatures by unknown keys are ignored (that is what
//! makes key rotation work), a known key whose signature fails rejects the note, and a note with
//! no verified signature is rejected.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";
/// More signature lines than this make a note malformed (the spec asks verifiers to take ≥ 16).
const MAX_SIGNATURES: usize = 100;

/// A key name must be non-empty and hold no whitespace and no `+`.
fn check_key_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(Error::BadKey(format!("key name {name:?} must be non-empty, without spaces or '+'")));
    }
    Ok(())
}

/// `SHA-256(name || 0x0A || 0x01 || public key)[:4]` as a big-endian integer.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519]);
    h.update(public_key);
    let digest = h.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// A named Ed25519 signing key.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner").field("name", &self.name).field("id", &format_args!("{:08x}", self.id)).finish()
    }
}

impl NoteSigner {
    pub fn new(name: &str, seed: [u8; 32]) -> Result<Self> {
        Self::with_key(name, SigningKey::from_bytes(&seed))
    }

    /// A signer named `name` for a key already derived from its seed.
    pub(crate) fn with_key(name: &str, key: SigningKey) -> Result<Self> {
        check_key_name(name)?;
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(NoteSigner { name: name.to_string(), key, id })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The verifier key for this signer.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier { name: self.name.clone(), id: self.id, key: self.key.verifying_key() }
    }

    /// One signature line (with its LF) over `text`.
    fn signature_line(&self, text: &str) -> String {
        let sig = self.key.sign(text.as_bytes());
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&self.id.to_be_bytes());
        blob.extend_from_slice(&sig.to_bytes());
        format!("{SIG_PREFIX}{} {}\n", self.name, B64.encode(blob))
    }
}

/// Signs `text` (which must end in LF) with every signer, in order.
pub fn sign_note(text: &str, signers: &[NoteSigner]) -> Result<String> {
    if !text.ends_with('\n') || text.contains("\n\n") && text.ends_with("\n\n") {
        return Err(Error::BadNote("note text must end in exactly one newline".into()));
    }
    if signers.is_empty() {
        return Err(Error::BadNote("a note needs at least one signer".into()));
    }
    let mut note = String::with_capacity(text.len() + 1 + signers.len() * 110);
    note.push_str(text);
    note.push('\n');
    for s in signers {
        note.push_str(&s.signature_line(text));
    }
    Ok(note)
}

/// A named Ed25519 verifier key, printed as `<name>+<hex key id>+<base64(0x01 || key)>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Parses a vkey, checking that its key ID matches its name and key.
    pub fn parse(vkey: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadKey(format!("vkey {vkey:?}: {why}"));
        let vkey = vkey.trim();
        let (name, rest) = vkey.split_once('+').ok_or_else(|| bad("expected <name>+<key id>+<key>"))?;
        let (id_hex, key_b64) = rest.split_once('+').ok_or_else(|| bad("expected <name>+<key id>+<key>"))?;
        check_key_name(name)?;
        if id_hex.len() != 8 {
            return Err(bad("key id must be 8 hex digits"));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| bad("key id is not hex"))?;
        let key = B64.decode(key_b64).map_err(|_| bad("key is not base64"))?;
        match key.split_first() {
            Some((&ED25519, rest)) if rest.len() == 32 => {
                let mut pk = [0u8; 32];
                pk.copy_from_slice(rest);
                if key_id(name, &pk) != id {
                    return Err(bad("key id does not match the name and key"));
                }
                let key = VerifyingKey::from_bytes(&pk).map_err(|_| bad("not a valid Ed25519 public key"))?;
                Ok(NoteVerifier { name: name.to_string(), id, key })
            }
            Some((&ED25519, _)) => Err(bad("an Ed25519 key is 32 bytes")),
            _ => Err(bad("unknown signature algorithm (only Ed25519, 0x01)")),
        }
    }

    /// The vkey text.
    pub fn vkey(&self) -> String {
        let mut key = Vec::with_capacity(33);
        key.push(ED25519);
        key.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(key))
    }
}

impl std::fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.vkey())
    }
}

/// A note whose signature by at least one trusted key verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNote {
    /// The signed text, including its final LF.
    pub text: String,
    /// Names of the trusted keys whose signatures verified.
    pub signed_by: Vec<String>,
}

/// One signature line of a note: the key name and the signature bytes (key ID first).
pub(crate) type SignatureLine<'a> = (&'a str, Vec<u8>);

/// Splits a note into its text (with final LF) and signature lines.
pub(crate) fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>)> {
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::BadNote("note holds control characters other than newline".into()));
    }
    let split = note.rfind("\n\n").ok_or_else(|| Error::BadNote("note has no blank line before its signatures".into()))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(Error::BadNote("note has no signature lines, or they do not end in a newline".into()));
    }
    let mut out = Vec::new();
    for line in sigs[..sigs.len() - 1].split('\n') {
        let body = line.strip_prefix(SIG_PREFIX).ok_or_else(|| Error::BadNote(format!("signature line {line:?} does not start with '\u{2014} '")))?;
        let (name, b64) = body.split_once(' ').ok_or_else(|| Error::BadNote(format!("signature line {line:?} has no signature")))?;
        check_key_name(name).map_err(|_| Error::BadNote(format!("signature line names an invalid key {name:?}")))?;
        let blob = B64.decode(b64).map_err(|_| Error::BadNote(format!("signature by {name} is not base64")))?;
        if blob.len() < 5 {
            return Err(Error::BadNote(format!("signature by {name} is too short")));
        }
        out.push((name, blob));
        if out.len() > MAX_SIGNATURES {
            return Err(Error::BadNote(format!("note has more than {MAX_SIGNATURES} signatures")));
        }
    }
    Ok((text, out))
}

/// Verifies `note` against `verifiers`: at least one must have signed it, and every signature
/// by a known key (same name and key ID) must verify. Unknown signatures are ignored.
pub fn verify_note(note: &str, verifiers: &[NoteVerifier]) -> Result<VerifiedNote> {
    let (text, sigs) = split_note(note)?;
    let mut signed_by: Vec<String> = Vec::new();
    let mut names_seen = Vec::new();
    for (name, blob) in &sigs {
        names_seen.push(format!("{name}+{:02x}{:02x}{:02x}{:02x}", blob[0], blob[1], blob[2], blob[3]));
        let id = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
        let Some(v) = verifiers.iter().find(|v| v.name == *name && v.id == id) else { continue };
        let sig = ed25519_dalek::Signature::from_slice(&blob[4..]).map_err(|_| Error::BadSignature(format!("signature by {name} has the wrong length")))?;
        v.key.verify(text.as_bytes(), &sig).map_err(|_| Error::BadSignature(format!("signature by {name}+{:08x} does not verify", v.id)))?;
        if !signed_by.iter().any(|n| n == name) {
            signed_by.push(name.to_string());
        }
    }
    if signed_by.is_empty() {
        let known: Vec<String> = verifiers.iter().map(|v| format!("{}+{:08x}", v.name, v.id)).collect();
        return Err(Error::UnknownKey(format!("signed by {names_seen:?}; trusted keys are {known:?}")));
    }
    Ok(VerifiedNote { text: text.to_string(), signed_by })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_VKEY: &str = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
    const SPEC_NOTE: &str = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";

    #[test]
    fn spec_test_vector_verifies() {
        let v = NoteVerifier::parse(SPEC_VKEY).unwrap();
        assert_eq!(v.vkey(), SPEC_VKEY, "vkey round-trips");
        let verified = verify_note(SPEC_NOTE, &[v]).unwrap();
        assert_eq!(verified.text, "This is an example message.\n");
        assert_eq!(verified.signed_by, ["example.com/foo"]);
    }

    #[test]
    fn spec_vector_rejects_every_single_byte_change_of_text_or_signature() {
        let v = NoteVerifier::parse(SPEC_VKEY).unwrap();
        let bytes = SPEC_NOTE.as_bytes();
        for i in 0..bytes.len() {
            let mut m = bytes.to_vec();
            m[i] = if m[i] == b'A' { b'B' } else { b'A' };
            if let Ok(s) = std::str::from_utf8(&m) {
                assert!(verify_note(s, std::slice::from_ref(&v)).is_err(), "mutation at byte {i} accepted");
            }
        }
    }

    #[test]
    fn sign_then_verify_with_rotation() {
        let old = NoteSigner::new("tally.example.com/t/acme", [7; 32]).unwrap();
        let new = NoteSigner::new("tally.example.com/t/acme", [9; 32]).unwrap();
        let note = sign_note("tally.example.com/t/acme\n3\nAAAA\n", &[old.clone(), new.clone()]).unwrap();
        // A verifier that knows only one of the two keys accepts: the other signature is ignored.
        assert_eq!(verify_note(&note, &[old.verifier()]).unwrap().signed_by, ["tally.example.com/t/acme"]);
        assert!(verify_note(&note, &[new.verifier()]).is_ok());
        let stranger = NoteSigner::new("tally.example.com/t/acme", [1; 32]).unwrap();
        assert!(matches!(verify_note(&note, &[stranger.verifier()]), Err(Error::UnknownKey(_))));
    }

    #[test]
    fn vkey_parse_errors_are_specific() {
        let bad_id = SPEC_VKEY.replace("530d903a", "530d903b");
        assert!(NoteVerifier::parse(&bad_id).unwrap_err().to_string().contains("key id does not match"));
        assert!(NoteVerifier::parse("nokey").is_err());
        assert!(NoteVerifier::parse("a b+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k").is_err());
    }

    #[test]
    fn malformed_notes_are_rejected() {
        let v = NoteVerifier::parse(SPEC_VKEY).unwrap();
        for bad in ["no blank line\n", "text\n\n", "text\n\nnot a signature\n", "text\n\n\u{2014} example.com/foo !!!\n"] {
            assert!(verify_note(bad, std::slice::from_ref(&v)).is_err(), "{bad:?}");
        }
        let extra_line = format!("{SPEC_NOTE}Unexpected line.\n");
        assert!(verify_note(&extra_line, &[v]).is_err());
    }
}
