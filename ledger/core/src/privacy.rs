//! Personal data kept off the log (docs/privacy.md): salted commitments to personal fields, the
//! subject keys their salts are derived from, and the store of those keys, where erasing a key
//! is what erases a subject.
//!
//! * [`Commitment`]: `SHA-256(salt ‖ u32be(len(field)) ‖ field ‖ value)`, 32 bytes. The length
//!   prefix pins where the field name ends, so `("ab", "c")` and `("a", "bc")` never commit to
//!   the same bytes. A commitment without its salt says nothing about a guessable value.
//! * [`SubjectKey`]: 32 random bytes per (tenant, subject, month). The salt of field `field` of record
//!   `seq` in `tenant`'s log is the first 16 bytes of
//!   `HMAC-SHA256(key, u32be(len(tenant)) ‖ tenant ‖ u64be(seq) ‖ field)`: deterministic, so a
//!   replay with the same keys writes the same commitments, and unrecoverable once the key is
//!   gone.
//! * [`SubjectKey::seal`]: a record's personal values (field → value), sealed under its
//!   subject's key with ChaCha20-Poly1305 (RFC 8439) so the ciphertext may sit in append-only
//!   storage: `0x01 ‖ shard u8 ‖ key id[16] ‖ nonce[12] ‖ ciphertext ‖ tag[16]`, the
//!   cipher key `HMAC-SHA256(key, 0xFF ‖ "tally-seal-v1")`, the key id the first 16 bytes of
//!   `HMAC-SHA256(key, 0xFE ‖ "tally-key-id-v1")`, the associated data the version, shard and
//!   key id bytes `‖ u32be(len(tenant)) ‖ tenant ‖ u64be(seq)` (a sealed blob opens only as its
//!   own record's, and no header byte can change unnoticed).
//!   The plaintext is the values as a JSON object with sorted members. Once the key is erased,
//!   nothing opens it. (Salt inputs start with a tenant length, whose first byte is 0x00 for any
//!   tenant id under 16 MiB, so none collides with the 0xFF and 0xFE inputs.)
//! * [`SubjectKeys`]: the keys of one partition, in 256 shard files under one directory, each
//!   replaced whole and durably ([`crate::durable`]) when it changes. Erasing a subject rewrites
//!   its shard without the key: afterwards no file of the store holds the key or the subject id
//!   (a replaced file is unlinked, not overwritten in place; what the filesystem does with freed
//!   blocks is outside any file).
//!
//! Invariants: a key handed out by [`SubjectKeys::key_for`] is durable once
//! [`SubjectKeys::persist`] returns, and a caller persists before anything derived from it is
//! durable; a shard file is whole (magic, entries in order, each in the shard its ids hash to,
//! CRC-32C) or reading it fails naming it; one writer per store (an exclusive lock on its `lock`
//! file, held while the store is open); files are the owner's only (0600, directory 0700); keys
//! live in memory only for shards that were touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Salts are 128 bits: the least the privacy model allows (docs/privacy.md).
pub const SALT_BYTES: usize = 16;

/// `u32be(len(text))`: the length prefix that fixes where a variable-length input ends.
fn len_prefix(text: &str) -> [u8; 4] {
    // Every text hashed here is far below 4 GiB (ids ≤ 1,024 bytes, entries ≤ 64 KiB).
    u32::try_from(text.len()).unwrap_or(u32::MAX).to_be_bytes()
}

/// The salt of one personal field of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Salt(pub [u8; SALT_BYTES]);

/// A salted commitment to one personal field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Commitment(pub [u8; 32]);

impl Commitment {
    /// The commitment to `value` of field `field` under `salt`.
    pub fn of(salt: &Salt, field: &str, value: &str) -> Commitment {
        let mut h = Sha256::new();
        h.update(salt.0);
        h.update(len_prefix(field));
        h.update(field.as_bytes());
        h.update(value.as_bytes());
        Commitment(h.finalize().into())
    }

    /// Whether `value` (with `salt`) is what this commits to for `field`.
    pub fn opens_to(&self, salt: &Salt, field: &str, value: &str) -> bool {
        Commitment::of(salt, field, value) == *self
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Commitment> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|e| Error::BadRecord(format!("commitment {text:?} is not 64 hex digits: {e}")))?;
        Ok(Commitment(bytes))
    }
}

/// One subject's key: what its salts are derived from.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectKey([u8; 32]);

impl std::fmt::Debug for SubjectKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(..)")
    }
}

impl SubjectKey {
    pub fn random() -> SubjectKey {
        SubjectKey(rand::random())
    }

    /// A key with these bytes (tests and known answers).
    pub fn from_bytes(bytes: [u8; 32]) -> SubjectKey {
        SubjectKey(bytes)
    }

    /// The salt of field `field` of record `seq` in `tenant`'s log (see the module docs).
    pub fn salt(&self, tenant: &str, seq: u64, field: &str) -> Salt {
        let full = self.hmac(&[&len_prefix(tenant), tenant.as_bytes(), &seq.to_be_bytes(), field.as_bytes()]);
        let mut salt = [0u8; SALT_BYTES];
        salt.copy_from_slice(&full[..SALT_BYTES]);
        Salt(salt)
    }

    /// A tag of an event's personal `values` that only this key can compute: what the ledger's
    /// deduplication compares instead of the values, so that no unsalted digest of personal
    /// data is kept (docs/privacy.md). `HMAC-SHA256(key, 0xFD ‖ "tally-content-v1" ‖
    /// u32be(len(tenant)) ‖ tenant ‖ values as sorted JSON)`.
    pub fn content_tag(&self, tenant: &str, values: &BTreeMap<String, String>) -> [u8; 32] {
        // A map of strings always serialises.
        let json = serde_json::to_vec(values).unwrap_or_default();
        self.hmac(&[b"\xFDtally-content-v1", &len_prefix(tenant), tenant.as_bytes(), &json])
    }

    /// HMAC-SHA256 under this key of the concatenation of `parts`.
    fn hmac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.0) else { unreachable!("HMAC takes keys of any length") };
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// The version byte of a sealed blob.
const SEALED_V1: u8 = 0x01;
/// Version, shard, key id and nonce.
const SEALED_HEADER: usize = 1 + 1 + 16 + 12;
/// Poly1305's tag.
const TAG_BYTES: usize = 16;

impl SubjectKey {
    fn derive(&self, label: &[u8]) -> [u8; 32] {
        self.hmac(&[label])
    }

    /// What a sealed blob names its key by: reveals nothing of the key or the subject.
    pub fn id(&self) -> [u8; 16] {
        let full = self.derive(b"\xFEtally-key-id-v1");
        let mut id = [0u8; 16];
        id.copy_from_slice(&full[..16]);
        id
    }

    /// Seals `values` of record `seq` in `tenant`'s log, a subject of shard `shard` (see
    /// [`SubjectKeys::shard_of`]) — see the module docs for the bytes.
    pub fn seal(&self, shard: u8, tenant: &str, seq: u64, values: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        let plaintext = serde_json::to_vec(values).map_err(|e| Error::BadRecord(format!("personal values: {e}")))?;
        let cipher = ChaCha20Poly1305::new(&self.derive(b"\xFFtally-seal-v1").into());
        let nonce: [u8; 12] = rand::random();
        let mut out = Vec::with_capacity(SEALED_HEADER + plaintext.len() + TAG_BYTES);
        out.push(SEALED_V1);
        out.push(shard);
        out.extend_from_slice(&self.id());
        let aad = associated_data(&out, tenant, seq);
        let sealed =
            cipher.encrypt(&nonce.into(), Payload { msg: &plaintext, aad: &aad }).map_err(|_| Error::BadRecord("personal values too long to seal".into()))?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The values `sealed` holds, if it is record `seq` of `tenant` sealed under this key;
    /// [`Error::BadRecord`] for anything else (another key, record or tenant, or changed bytes).
    pub fn open(&self, tenant: &str, seq: u64, sealed: &[u8]) -> Result<BTreeMap<String, String>> {
        let header = SealedHeader::parse(sealed)?;
        if header.key_id != self.id() {
            return Err(Error::BadRecord("sealed under another key".into()));
        }
        let cipher = ChaCha20Poly1305::new(&self.derive(b"\xFFtally-seal-v1").into());
        let aad = associated_data(&sealed[..18], tenant, seq);
        let plaintext = cipher
            .decrypt(&header.nonce.into(), Payload { msg: &sealed[SEALED_HEADER..], aad: &aad })
            .map_err(|_| Error::BadRecord(format!("sealed values of {tenant} seq {seq} do not open: changed, or not this record's")))?;
        serde_json::from_slice(&plaintext).map_err(|e| Error::BadRecord(format!("sealed values of {tenant} seq {seq}: {e}")))
    }
}

/// The header's version, shard and key id, then the record the blob belongs to.
fn associated_data(header: &[u8], tenant: &str, seq: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 4 + tenant.len() + 8);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&len_prefix(tenant));
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

/// Where a subject key is, by what a sealed blob names it by: its shard and id. Reveals nothing
/// of the key or the subject, so an `erasure` record can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRef {
    pub shard: u8,
    pub id: [u8; 16],
}

impl KeyRef {
    /// `<shard, 2 hex digits><id, 32 hex digits>`.
    pub fn to_hex(&self) -> String {
        format!("{:02x}{}", self.shard, hex::encode(self.id))
    }

    /// Parses [`KeyRef::to_hex`].
    pub fn from_hex(text: &str) -> Result<KeyRef> {
        let mut bytes = [0u8; 17];
        hex::decode_to_slice(text, &mut bytes).map_err(|e| Error::BadRecord(format!("key {text:?} is not 34 hex digits: {e}")))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[1..]);
        Ok(KeyRef { shard: bytes[0], id })
    }
}

impl serde::Serialize for KeyRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for KeyRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KeyRef::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// One personal field of a record as a reader is given it: the value and the salt that open the
/// field's commitment in the signed record ([`Commitment::opens_to`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opening {
    pub value: String,
    /// The salt, 32 lower-case hex digits.
    pub salt: String,
}

impl Opening {
    /// Whether this opens `commitment` for `field`; false for a salt that is not 16 bytes of hex.
    pub fn opens(&self, field: &str, commitment: &Commitment) -> bool {
        let mut salt = [0u8; SALT_BYTES];
        hex::decode_to_slice(&self.salt, &mut salt).is_ok() && commitment.opens_to(&Salt(salt), field, &self.value)
    }
}

/// A record's personal fields as a reader gets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revealed {
    /// Every field's value and salt, by field name.
    Open(BTreeMap<String, Opening>),
    /// The subject's key is erased: nothing opens them any more.
    Erased,
}

/// What a sealed blob says of its key, readable without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedHeader {
    pub shard: u8,
    pub key_id: [u8; 16],
    nonce: [u8; 12],
}

impl SealedHeader {
    pub fn parse(sealed: &[u8]) -> Result<SealedHeader> {
        if sealed.len() < SEALED_HEADER + TAG_BYTES || sealed[0] != SEALED_V1 {
            return Err(Error::BadRecord("not sealed personal values (bad version or too short)".into()));
        }
        let mut key_id = [0u8; 16];
        key_id.copy_from_slice(&sealed[2..18]);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&sealed[18..SEALED_HEADER]);
        Ok(SealedHeader { shard: sealed[1], key_id, nonce })
    }
}

/// First bytes of every shard file.
const SHARD_MAGIC: &[u8; 12] = b"TALLYKEYS03\n";
/// The format before appends: one sorted run of entries and a checksum, read and rewritten.
const OLD_SHARD_MAGIC: &[u8; 12] = b"TALLYKEYS02\n";
const SHARDS: usize = 256;
/// Tenant ids and subject ids are at most this long (as identifiers are; docs/limits.md).
const MAX_ID_BYTES: usize = 1024;

/// Keys of one shard, by (tenant, subject, period).
type Shard = BTreeMap<Holder, SubjectKey>;

/// Whose a key is: a subject of a tenant, for one period (a UTC month, `YYYY-MM`). A subject has
/// a key per month its records occurred in, so that retention erases old months and keeps the
/// rest; all of a subject's keys live in one shard, so erasing it reads one file.
type Holder = (String, String, String);

/// Makes the key of a new (tenant, subject, period).
type KeySource = Box<dyn FnMut(&str, &str, &str) -> SubjectKey + Send>;

/// The period of a record that occurred at `at`: its UTC month, `YYYY-MM`.
pub fn period_of(at: jiff::Timestamp) -> String {
    // Instants before year 0 (jiff reaches -9999) would print a sign: they share month 0000-01,
    // so that no valid event can make a key's period malformed.
    if at.as_second() < FIRST_PERIOD_START_SECOND {
        return "0000-01".to_string();
    }
    at.strftime("%Y-%m").to_string()
}

/// 0000-01-01T00:00:00Z, in seconds since the Unix epoch.
const FIRST_PERIOD_START_SECOND: i64 = -62_167_219_200;

/// Whether `period` is a `YYYY-MM` month.
fn is_period(period: &str) -> bool {
    let b = period.as_bytes();
    b.len() == 7 && b[4] == b'-' && b.iter().enumerate().all(|(i, c)| i == 4 || c.is_ascii_digit())
}

/// The subject keys of one partition (see the module docs).
pub struct SubjectKeys {
    dir: PathBuf,
    /// Held open for its exclusive lock: one writer per store. `None`: a read-only store
    /// ([`SubjectKeys::open_read_only`]), which creates, erases and writes nothing.
    lock: Option<std::fs::File>,
    /// Where new keys come from: random, except in known-answer tests.
    new_key: KeySource,
    /// Shards read so far (`None`: not read yet).
    shards: Vec<Option<Shard>>,
    /// For each shard read, its keys by id ([`SubjectKey::id`]): a sealed blob names its key by
    /// id, and finding it must not cost an HMAC per key of the shard.
    ids: Vec<HashMap<[u8; 16], Holder>>,
    /// Shards to write whole at the next [`SubjectKeys::persist`] (a key forgotten, a torn
    /// tail or an older format found), and keys created since the last one, to append.
    rewrite: BTreeSet<usize>,
    appends: BTreeMap<usize, Vec<Holder>>,
    /// Keys retired by [`SubjectKeys::retire`]: no new record is sealed under them, but they
    /// still open what was, until [`SubjectKeys::forget`] deletes them. By id.
    retired: HashMap<[u8; 16], (usize, Holder, SubjectKey)>,
}

impl SubjectKeys {
    /// The store under `dir`, created if missing (mode 0700); temporaries a crash left are
    /// removed. Fails if another `SubjectKeys` has it open, in this process or another.
    pub fn open(dir: &Path) -> Result<SubjectKeys> {
        use std::os::unix::fs::PermissionsExt;
        crate::durable::create_dir_durably(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Corrupt { path: dir.display().to_string(), detail: "the subject key store is open in another writer".into() })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        // Only now: a live writer's temporary is never ours to remove.
        crate::durable::remove_temporaries(dir)?;
        Ok(SubjectKeys {
            dir: dir.to_path_buf(),
            lock: Some(lock),
            new_key: Box::new(|_, _, _| SubjectKey::random()),
            shards: vec![None; SHARDS],
            ids: vec![HashMap::new(); SHARDS],
            rewrite: BTreeSet::new(),
            appends: BTreeMap::new(),
            retired: HashMap::new(),
        })
    }

    /// The store under `dir` for reading what its writer persisted (a missing directory is an
    /// empty store): takes no lock and changes no file. Shards are read when first needed and
    /// each is whole (files are replaced, never written in place); an erasure persisted after
    /// a shard was read is not seen by this handle.
    pub fn open_read_only(dir: &Path) -> SubjectKeys {
        SubjectKeys {
            dir: dir.to_path_buf(),
            lock: None,
            new_key: Box::new(|_, _, _| SubjectKey::random()),
            shards: vec![None; SHARDS],
            ids: vec![HashMap::new(); SHARDS],
            rewrite: BTreeSet::new(),
            appends: BTreeMap::new(),
            retired: HashMap::new(),
        }
    }

    /// New keys from `new_key(tenant, subject)` instead of random ones: for known-answer tests,
    /// whose records must be the same bytes every run. Never for a real store: a key anyone can
    /// derive protects nothing.
    pub fn derive_new_keys_for_tests(&mut self, new_key: impl FnMut(&str, &str, &str) -> SubjectKey + Send + 'static) {
        self.new_key = Box::new(new_key);
    }

    fn writable(&self) -> Result<()> {
        match self.lock {
            Some(_) => Ok(()),
            None => Err(Error::Corrupt { path: self.dir.display().to_string(), detail: "the subject key store is open read-only".into() }),
        }
    }

    /// The key of `subject` in `tenant` for `period`, if it has one (it was never created, or it
    /// was erased).
    pub fn key(&mut self, tenant: &str, subject: &str, period: &str) -> Result<Option<SubjectKey>> {
        let shard = self.shard(tenant, subject)?;
        Ok(shard.get(&(tenant.to_string(), subject.to_string(), period.to_string())).cloned())
    }

    /// The key of `subject` in `tenant` for `period` ([`period_of`]), created (not yet durable:
    /// see [`SubjectKeys::persist`]) if it has none.
    pub fn key_for(&mut self, tenant: &str, subject: &str, period: &str) -> Result<SubjectKey> {
        check_id("tenant", tenant)?;
        check_id("subject", subject)?;
        if !is_period(period) {
            return Err(Error::BadKey(format!("a key period is a month, YYYY-MM, not {period:?}")));
        }
        if let Some(key) = self.key(tenant, subject, period)? {
            return Ok(key);
        }
        self.writable()?;
        let key = (self.new_key)(tenant, subject, period);
        let index = shard_of(tenant, subject);
        let holder = (tenant.to_string(), subject.to_string(), period.to_string());
        self.shard(tenant, subject)?.insert(holder.clone(), key.clone());
        self.ids[index].insert(key.id(), holder.clone());
        self.appends.entry(index).or_default().push(holder);
        Ok(key)
    }

    /// The shard a subject of `tenant` lives in: what [`SubjectKey::seal`] records.
    pub fn shard_of(tenant: &str, subject: &str) -> u8 {
        // `shard_of` is below 256 by construction.
        u8::try_from(shard_of(tenant, subject)).unwrap_or_default()
    }

    /// The key a sealed blob of `tenant` names, if it still exists: `None` once erased.
    pub fn key_of_sealed(&mut self, tenant: &str, header: &SealedHeader) -> Result<Option<SubjectKey>> {
        let index = usize::from(header.shard);
        self.load(index)?;
        if let Some((_, (t, _, _), key)) = self.retired.get(&header.key_id).filter(|(i, _, _)| *i == index) {
            return Ok((t == tenant).then(|| key.clone()));
        }
        let Some(holder) = self.ids[index].get(&header.key_id).filter(|(t, _, _)| t == tenant).cloned() else { return Ok(None) };
        Ok(self.shards[index].as_ref().and_then(|shard| shard.get(&holder).cloned()))
    }

    /// Where the keys of `tenant` are (shard and id): `subject`'s (reading its one shard), or
    /// with `None` every subject's (reading every shard); with `before`, only those of periods
    /// before that month (`YYYY-MM`).
    pub fn key_refs(&mut self, tenant: &str, subject: Option<&str>, before: Option<&str>) -> Result<Vec<KeyRef>> {
        let shards: Vec<usize> = match subject {
            Some(s) => vec![shard_of(tenant, s)],
            None => (0..SHARDS).collect(),
        };
        let mut refs = Vec::new();
        for index in shards {
            self.load(index)?;
            let shard = u8::try_from(index).unwrap_or_default();
            let wanted = |(t, s, p): &Holder| t == tenant && subject.is_none_or(|x| x == s) && before.is_none_or(|b| p.as_str() < b);
            refs.extend(self.ids[index].iter().filter(|(_, h)| wanted(h)).map(|(id, _)| KeyRef { shard, id: *id }));
        }
        refs.sort();
        Ok(refs)
    }

    /// Every key, in every shard, whose period is before the cutoff `cutoff(tenant)` gives for
    /// its tenant (`None`: keep), by tenant: what a retention pass erases. Reads every shard.
    pub fn expired(&mut self, cutoff: impl Fn(&str) -> Option<String>) -> Result<BTreeMap<String, Vec<KeyRef>>> {
        let mut out: BTreeMap<String, Vec<KeyRef>> = BTreeMap::new();
        let mut cutoffs: HashMap<String, Option<String>> = HashMap::new();
        for index in 0..SHARDS {
            self.load(index)?;
            let shard = u8::try_from(index).unwrap_or_default();
            for (id, (tenant, _, period)) in &self.ids[index] {
                let before = cutoffs.entry(tenant.clone()).or_insert_with(|| cutoff(tenant));
                if before.as_deref().is_some_and(|b| period.as_str() < b) {
                    out.entry(tenant.clone()).or_default().push(KeyRef { shard, id: *id });
                }
            }
        }
        for refs in out.values_mut() {
            refs.sort();
        }
        Ok(out)
    }

    /// Forgets the key `key` names if it is one of `tenant`'s (durably at the next
    /// [`SubjectKeys::persist`]); whether it was there.
    pub fn forget(&mut self, tenant: &str, key: KeyRef) -> Result<bool> {
        self.writable()?;
        let index = usize::from(key.shard);
        self.load(index)?;
        if self.retired.get(&key.id).is_some_and(|(i, (t, _, _), _)| *i == index && t == tenant) {
            // Out of its shard already (`retire`): the next persist writes the shard without it.
            self.retired.remove(&key.id);
            self.rewrite.insert(index);
            return Ok(true);
        }
        let Some(holder) = self.ids[index].get(&key.id).filter(|(t, _, _)| t == tenant).cloned() else { return Ok(false) };
        self.ids[index].remove(&key.id);
        if let Some(shard) = self.shards[index].as_mut() {
            shard.remove(&holder);
        }
        self.rewrite.insert(index);
        Ok(true)
    }

    /// Retires `key` of `tenant`, named by an `erasure` record about to be made durable: from now
    /// on [`SubjectKeys::key_for`] hands out a new key for its (subject, month), so no record
    /// appended after the erasure is sealed under a key it deletes; what was sealed under it still
    /// opens until [`SubjectKeys::forget`]. Changes no file, and the next
    /// [`SubjectKeys::persist`] must wait for the record to be durable: the caller persists
    /// before it retires, and only forgets (which persists) after (see `Ledger::retire_keys`).
    /// Whether it was one of `tenant`'s live keys.
    pub fn retire(&mut self, tenant: &str, key: KeyRef) -> Result<bool> {
        self.writable()?;
        let index = usize::from(key.shard);
        self.load(index)?;
        let Some(holder) = self.ids[index].get(&key.id).filter(|(t, _, _)| t == tenant).cloned() else { return Ok(false) };
        self.ids[index].remove(&key.id);
        let Some(live) = self.shards[index].as_mut().and_then(|shard| shard.remove(&holder)) else { return Ok(false) };
        self.retired.insert(key.id, (index, holder, live));
        Ok(true)
    }

    /// The personal values sealed in `sealed` (record `seq` of `tenant`) with their salts, or
    /// [`Revealed::Erased`] when the key they were sealed under is gone. A blob that does not
    /// open under its key is an error: the journal's checksums make that damage, not erasure.
    pub fn reveal(&mut self, tenant: &str, seq: u64, sealed: &[u8]) -> Result<Revealed> {
        let header = SealedHeader::parse(sealed)?;
        let Some(key) = self.key_of_sealed(tenant, &header)? else { return Ok(Revealed::Erased) };
        let values = key.open(tenant, seq, sealed)?;
        Ok(Revealed::Open(
            values
                .into_iter()
                .map(|(field, value)| {
                    let salt = hex::encode(key.salt(tenant, seq, &field).0);
                    (field, Opening { value, salt })
                })
                .collect(),
        ))
    }

    /// Forgets every key of `subject` in `tenant`, all periods (durably at the next
    /// [`SubjectKeys::persist`]); how many.
    pub fn erase_subject(&mut self, tenant: &str, subject: &str) -> Result<usize> {
        let mut removed = 0;
        for key in self.key_refs(tenant, Some(subject), None)? {
            removed += usize::from(self.forget(tenant, key)?);
        }
        Ok(removed)
    }

    /// Forgets every key of `tenant` (offboarding); how many. Reads every shard.
    pub fn erase_tenant(&mut self, tenant: &str) -> Result<usize> {
        self.writable()?;
        let mut removed = 0;
        for key in self.key_refs(tenant, None, None)? {
            removed += usize::from(self.forget(tenant, key)?);
        }
        Ok(removed)
    }

    /// Makes every change durable; how many shard files were written. A shard that lost a key
    /// is replaced whole (temporary file, fsync, rename: [`crate::durable`]); new keys are
    /// appended to their shard's file as one checksummed batch and fsynced, so a commit that
    /// brings new subjects costs a few hundred bytes per shard, not the shard's size. After it
    /// returns, created keys survive a crash and forgotten keys are in no file of the store.
    pub fn persist(&mut self) -> Result<usize> {
        if self.rewrite.is_empty() && self.appends.is_empty() {
            return Ok(0);
        }
        self.writable()?;
        let rewrite = std::mem::take(&mut self.rewrite);
        let mut appends = std::mem::take(&mut self.appends);
        let touched: BTreeSet<usize> = rewrite.iter().copied().chain(appends.keys().copied()).collect();
        for (done, &index) in touched.iter().enumerate() {
            let path = self.shard_path(index);
            let whole = rewrite.contains(&index) || !path.exists();
            let written = if whole {
                crate::durable::replace_secret_file(&path, &self.encode_whole(index))
            } else {
                let new = appends.remove(&index).unwrap_or_default();
                self.append_batch(&path, index, &new)
            };
            if let Err(e) = written {
                // What was not written is written whole at the next call (an append may have
                // left a torn batch, which a whole rewrite replaces).
                self.rewrite.extend(touched.iter().skip(done));
                return Err(e);
            }
        }
        Ok(touched.len())
    }

    /// Shard `index` as a whole file: its retired keys first (still to be forgotten), then its
    /// live ones, so that a reader takes the live key of a (tenant, subject, month) as the last.
    fn encode_whole(&self, index: usize) -> Vec<u8> {
        let mut entries = Vec::new();
        for (_, (i, holder, key)) in self.retired.iter().filter(|(_, (i, _, _))| *i == index) {
            debug_assert_eq!(*i, index);
            encode_entry(&mut entries, holder, key);
        }
        for (holder, key) in self.shards[index].iter().flatten() {
            encode_entry(&mut entries, holder, key);
        }
        let mut out = SHARD_MAGIC.to_vec();
        encode_batch(&mut out, &entries);
        out
    }

    /// Appends the keys of `holders` (created since the last persist) to shard `index`'s file
    /// as one batch, and fsyncs it.
    fn append_batch(&self, path: &Path, index: usize, holders: &[Holder]) -> Result<()> {
        use std::io::Write as _;
        let mut entries = Vec::new();
        let shard = self.shards[index].as_ref();
        for holder in holders {
            // A key created and forgotten before this persist is in no file: nothing to append.
            if let Some(key) = shard.and_then(|s| s.get(holder)) {
                encode_entry(&mut entries, holder, key);
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::new();
        encode_batch(&mut batch, &entries);
        let mut file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        file.write_all(&batch).and_then(|()| file.sync_data()).map_err(|e| Error::io(path, e))
    }

    fn shard(&mut self, tenant: &str, subject: &str) -> Result<&mut Shard> {
        self.load(shard_of(tenant, subject))
    }

    fn load(&mut self, index: usize) -> Result<&mut Shard> {
        if self.shards[index].is_none() {
            let path = self.shard_path(index);
            let decoded = match std::fs::read(&path) {
                Ok(bytes) => decode_shard(index, &bytes).map_err(|detail| Error::Corrupt { path: path.display().to_string(), detail })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Decoded::default(),
                Err(e) => return Err(Error::io(&path, e)),
            };
            if decoded.rewrite && self.lock.is_some() {
                // A torn last batch (a crash during an append: no record depended on its keys
                // yet) or the older format: the next persist writes the shard whole.
                self.rewrite.insert(index);
            }
            for (holder, key) in decoded.superseded {
                self.retired.insert(key.id(), (index, holder, key));
            }
            let shard = decoded.live;
            self.ids[index] = shard.iter().map(|(ids, key)| (key.id(), ids.clone())).collect();
            self.shards[index] = Some(shard);
        }
        Ok(self.shards[index].get_or_insert_with(Shard::new))
    }

    fn shard_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{index:02x}.keys"))
    }
}

fn check_id(what: &str, id: &str) -> Result<()> {
    if id.len() > MAX_ID_BYTES {
        return Err(Error::BadKey(format!("a {what} id is at most {MAX_ID_BYTES} bytes; this one is {}", id.len())));
    }
    Ok(())
}

/// Which shard holds (tenant, subject): spread by hash, so a tenant with many subjects does not
/// make one shard large.
fn shard_of(tenant: &str, subject: &str) -> usize {
    let mut h = Sha256::new();
    h.update(len_prefix(tenant));
    h.update(tenant.as_bytes());
    h.update(subject.as_bytes());
    usize::from(h.finalize()[0])
}

/// `u16be len ‖ tenant ‖ u16be len ‖ subject ‖ u16be len ‖ period ‖ key[32]`, appended to `out`.
fn encode_entry(out: &mut Vec<u8>, (tenant, subject, period): &Holder, key: &SubjectKey) {
    for id in [tenant, subject, period] {
        // Ids are checked to fit in `key_for`.
        out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out.extend_from_slice(&key.0);
}

/// `u32be len(entries) ‖ entries ‖ u32be crc32c(entries)`, appended to `out`.
fn encode_batch(out: &mut Vec<u8>, entries: &[u8]) {
    // A batch holds the keys of one commit or one shard: far below 4 GiB.
    out.extend_from_slice(&u32::try_from(entries.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(entries);
    out.extend_from_slice(&crc32c::crc32c(entries).to_be_bytes());
}

/// A shard file, read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Decoded {
    /// The live key of each (tenant, subject, month): the last entry for it.
    live: Shard,
    /// Earlier keys of a (tenant, subject, month) a later entry replaced: retired keys whose
    /// erasure was not yet complete when the file was written. They still open their records.
    superseded: Vec<(Holder, SubjectKey)>,
    /// The file should be written whole: a torn last batch was dropped, or it is in the older
    /// format.
    rewrite: bool,
}

/// Reads shard `index`: `SHARD_MAGIC ‖ batch*` ([`encode_batch`] of [`encode_entry`]s). A last
/// batch cut short or failing its checksum is a torn append (a crash before its fsync returned,
/// so no record depended on its keys) and is dropped; any other damage is refused, as are
/// entries too long or in a shard their ids do not hash to (such an entry could not be found,
/// so never erased). The older whole-file format (`TALLYKEYS02`) is read too.
fn decode_shard(index: usize, bytes: &[u8]) -> std::result::Result<Decoded, String> {
    if bytes.starts_with(OLD_SHARD_MAGIC) {
        let live = decode_old_shard(index, bytes)?;
        return Ok(Decoded { live, superseded: Vec::new(), rewrite: true });
    }
    if !bytes.starts_with(SHARD_MAGIC) {
        return Err("not a key shard (bad magic)".into());
    }
    let mut out = Decoded::default();
    let mut pos = SHARD_MAGIC.len();
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let Some(len) = rest.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
            out.rewrite = true;
            break;
        };
        let Some(end) = len.checked_add(8).filter(|end| *end <= rest.len()) else {
            out.rewrite = true;
            break;
        };
        let entries = &rest[4..4 + len];
        let stored = u32::from_be_bytes([rest[4 + len], rest[5 + len], rest[6 + len], rest[7 + len]]);
        if crc32c::crc32c(entries) != stored {
            if pos + end == bytes.len() {
                out.rewrite = true;
                break;
            }
            return Err("checksum mismatch: the file is damaged".into());
        }
        decode_entries(index, entries, &mut out)?;
        pos += end;
    }
    Ok(out)
}

/// The entries of one batch, into `out`: a later entry for the same (tenant, subject, month)
/// supersedes an earlier one.
fn decode_entries(index: usize, mut rest: &[u8], out: &mut Decoded) -> std::result::Result<(), String> {
    while !rest.is_empty() {
        let (holder, key) = decode_entry(index, &mut rest)?;
        if let Some(earlier) = out.live.insert(holder.clone(), key) {
            out.superseded.push((holder, earlier));
        }
    }
    Ok(())
}

/// One entry from the front of `rest`, checked.
fn decode_entry(index: usize, rest: &mut &[u8]) -> std::result::Result<(Holder, SubjectKey), String> {
    let take = |n: usize, rest: &mut &[u8]| -> std::result::Result<Vec<u8>, String> {
        if rest.len() < n {
            return Err("truncated entry".into());
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.to_vec())
    };
    let mut ids = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = take(2, rest)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        ids.push(String::from_utf8(take(len, rest)?).map_err(|_| "an id is not UTF-8")?);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&take(32, rest)?);
    let period = ids.pop().unwrap_or_default();
    let subject = ids.pop().unwrap_or_default();
    let tenant = ids.pop().unwrap_or_default();
    if tenant.len() > MAX_ID_BYTES || subject.len() > MAX_ID_BYTES {
        return Err("an id is longer than 1,024 bytes".into());
    }
    if !is_period(&period) {
        return Err("a key's period is not a YYYY-MM month".into());
    }
    if shard_of(&tenant, &subject) != index {
        return Err("an entry belongs to another shard".into());
    }
    Ok(((tenant, subject, period), SubjectKey(key)))
}

/// The older format: `TALLYKEYS02\n ‖ entry* ‖ u32be crc32c(all before)`, entries in order and
/// unique, replaced whole at every change.
fn decode_old_shard(index: usize, bytes: &[u8]) -> std::result::Result<Shard, String> {
    let body_len = bytes.len().checked_sub(4).filter(|n| *n >= OLD_SHARD_MAGIC.len()).ok_or("shorter than a key shard's magic and checksum")?;
    let (body, crc) = bytes.split_at(body_len);
    let stored = u32::from_be_bytes(crc.try_into().map_err(|_| "bad checksum length")?);
    if crc32c::crc32c(body) != stored {
        return Err("checksum mismatch: the file is damaged".into());
    }
    let mut rest = &body[OLD_SHARD_MAGIC.len()..];
    let mut shard = Shard::new();
    while !rest.is_empty() {
        let (holder, key) = decode_entry(index, &mut rest)?;
        if shard.last_key_value().is_some_and(|(last, _)| *last >= holder) {
            return Err("entries out of order or repeated".into());
        }
        shard.insert(holder, key);
    }
    Ok(shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The period of every key these tests make.
    const P: &str = "2026-11";

    #[test]
    fn every_instant_has_a_well_formed_period() {
        assert_eq!(period_of(jiff::Timestamp::MIN), "0000-01");
        for (at, want) in [
            ("0000-01-01T00:30:00+01:00", "0000-01"),
            ("0000-01-01T00:00:00Z", "0000-01"),
            ("2026-11-30T23:59:59Z", "2026-11"),
            ("9999-12-30T00:00:00Z", "9999-12"),
        ] {
            let period = period_of(at.parse().unwrap());
            assert!(is_period(&period) && period == want, "{at}: {period}");
        }
    }

    #[test]
    fn a_subject_has_a_key_per_month_and_retention_finds_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let old = keys.key_for("acme", "user-ann", "2026-01").unwrap();
        let new = keys.key_for("acme", "user-ann", "2026-11").unwrap();
        assert_ne!(old, new, "another month, another key");
        keys.key_for("globex", "user-ann", "2026-01").unwrap();
        assert!(keys.key_for("acme", "user-ann", "2026-1").is_err() && keys.key_for("acme", "user-ann", "../x").is_err(), "periods are months");
        assert_eq!(keys.key_refs("acme", Some("user-ann"), None).unwrap().len(), 2);
        assert_eq!(keys.key_refs("acme", None, Some("2026-06")).unwrap(), [KeyRef { shard: SubjectKeys::shard_of("acme", "user-ann"), id: old.id() }]);
        // Retention: acme keeps 6 months from 2026-12, globex has no policy.
        let expired = keys.expired(|t| (t == "acme").then(|| "2026-06".to_string())).unwrap();
        assert_eq!(expired.keys().collect::<Vec<_>>(), ["acme"]);
        assert_eq!(expired["acme"].len(), 1);
        assert!(keys.forget("acme", expired["acme"][0]).unwrap());
        keys.persist().unwrap();
        let mut reopened = SubjectKeys::open_read_only(dir.path());
        assert_eq!(reopened.key("acme", "user-ann", "2026-01").unwrap(), None);
        assert_eq!(reopened.key("acme", "user-ann", "2026-11").unwrap(), Some(new));
        assert!(reopened.key("globex", "user-ann", "2026-01").unwrap().is_some());
        assert!(reopened.key_for("acme", "someone", P).is_err(), "a read-only store creates nothing");
    }

    fn salt(byte: u8) -> Salt {
        Salt([byte; SALT_BYTES])
    }

    #[test]
    fn a_commitment_opens_only_to_its_value_field_and_salt() {
        let c = Commitment::of(&salt(1), "attributes.email", "ann@example.com");
        assert!(c.opens_to(&salt(1), "attributes.email", "ann@example.com"));
        assert!(!c.opens_to(&salt(1), "attributes.email", "bob@example.com"));
        assert!(!c.opens_to(&salt(1), "attributes.mail", "ann@example.com"));
        assert!(!c.opens_to(&salt(2), "attributes.email", "ann@example.com"));
        // Moving the boundary between field and value changes the commitment.
        assert_ne!(Commitment::of(&salt(1), "ab", "c"), Commitment::of(&salt(1), "a", "bc"));
        assert_eq!(Commitment::from_hex(&c.to_hex()).unwrap(), c);
        assert!(Commitment::from_hex("xyz").is_err());
    }

    #[test]
    fn the_commitment_is_sha256_of_salt_length_field_and_value() {
        // Spelled out, so an implementation in another language can be checked against it.
        let mut bytes = vec![7u8; SALT_BYTES];
        bytes.extend_from_slice(&[0, 0, 0, 5]);
        bytes.extend_from_slice(b"email");
        bytes.extend_from_slice(b"a@b");
        let expected: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(Commitment::of(&salt(7), "email", "a@b").0, expected);
    }

    #[test]
    fn salts_are_deterministic_per_key_and_differ_per_tenant_seq_and_field() {
        let key = SubjectKey::from_bytes([9; 32]);
        let s = key.salt("acme", 7, "attributes.email");
        assert_eq!(s, key.salt("acme", 7, "attributes.email"));
        assert_ne!(s, key.salt("acme", 8, "attributes.email"));
        assert_ne!(s, key.salt("acme", 7, "attributes.name"));
        assert_ne!(s, key.salt("acmf", 7, "attributes.email"));
        assert_ne!(s, SubjectKey::from_bytes([8; 32]).salt("acme", 7, "attributes.email"));
        assert_eq!(format!("{key:?}"), "SubjectKey(..)", "a key never reaches a log line");
    }

    #[test]
    fn sealed_values_open_only_as_their_own_record_under_their_own_key() {
        let key = SubjectKey::from_bytes([3; 32]);
        let values = BTreeMap::from([("attributes.email".to_string(), "ann@example.com".to_string())]);
        let sealed = key.seal(7, "acme", 42, &values).unwrap();
        assert!(!contains(&sealed, b"ann@example.com"), "sealed bytes hold the value in clear");
        let header = SealedHeader::parse(&sealed).unwrap();
        assert_eq!((header.shard, header.key_id), (7, key.id()));
        assert_eq!(key.open("acme", 42, &sealed).unwrap(), values);
        assert!(key.open("acme", 43, &sealed).is_err(), "another record's");
        assert!(key.open("acmf", 42, &sealed).is_err(), "another tenant's");
        assert!(SubjectKey::from_bytes([4; 32]).open("acme", 42, &sealed).is_err(), "another key");
        for i in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[i] ^= 0x01;
            assert!(key.open("acme", 42, &changed).is_err(), "byte {i} changed and it still opened");
        }
        assert_ne!(key.seal(7, "acme", 42, &values).unwrap(), sealed, "a fresh nonce each time");
        assert!(SealedHeader::parse(&sealed[..SEALED_HEADER + TAG_BYTES - 1]).is_err());
    }

    #[test]
    fn a_sealed_blob_finds_its_key_until_the_subject_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let ann = keys.key_for("acme", "user-ann", P).unwrap();
        keys.key_for("acme", "user-bob", P).unwrap();
        let values = BTreeMap::from([("attributes.name".to_string(), "Ann".to_string())]);
        let sealed = ann.seal(SubjectKeys::shard_of("acme", "user-ann"), "acme", 1, &values).unwrap();
        let header = SealedHeader::parse(&sealed).unwrap();
        assert_eq!(keys.key_of_sealed("acme", &header).unwrap(), Some(ann.clone()));
        assert_eq!(keys.key_of_sealed("globex", &header).unwrap(), None, "keys are per tenant");
        keys.erase_subject("acme", "user-ann").unwrap();
        keys.persist().unwrap();
        assert_eq!(keys.key_of_sealed("acme", &header).unwrap(), None, "erased: nothing opens it");
    }

    /// A retired key still opens what it sealed, but new records get a new key; forgetting it
    /// removes it from the shard file at the next persist, with the new key written.
    #[test]
    fn a_retired_key_opens_old_records_seals_no_new_ones_and_goes_when_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let old = keys.key_for("acme", "user-ann", P).unwrap();
        keys.persist().unwrap();
        let shard = SubjectKeys::shard_of("acme", "user-ann");
        let sealed = old.seal(shard, "acme", 1, &BTreeMap::from([("actor_id".to_string(), "user-ann".to_string())])).unwrap();
        let header = SealedHeader::parse(&sealed).unwrap();
        let old_ref = KeyRef { shard, id: old.id() };
        assert!(!keys.retire("globex", old_ref).unwrap(), "keys are per tenant");
        assert!(keys.retire("acme", old_ref).unwrap());
        assert_eq!(keys.key_of_sealed("acme", &header).unwrap(), Some(old.clone()), "still opens what it sealed");
        assert_eq!(keys.key_refs("acme", None, None).unwrap(), Vec::<KeyRef>::new(), "no longer a live key to erase");
        let new = keys.key_for("acme", "user-ann", P).unwrap();
        assert_ne!(new, old);
        assert!(contains(&all_bytes(dir.path()), &old.0), "retiring writes nothing");
        assert!(keys.forget("acme", old_ref).unwrap());
        assert_eq!(keys.persist().unwrap(), 1);
        assert_eq!(keys.key_of_sealed("acme", &header).unwrap(), None);
        let bytes = all_bytes(dir.path());
        assert!(!contains(&bytes, &old.0) && contains(&bytes, &new.0));
    }

    /// Every file under `dir`, read whole.
    fn all_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.extend(std::fs::read(e.path()).unwrap());
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn keys_survive_a_reopen_only_once_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let ann = keys.key_for("acme", "user-ann", P).unwrap();
        assert_eq!(keys.key_for("acme", "user-ann", P).unwrap(), ann, "one key per subject");
        let files = || std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name() != "lock").count();
        assert_eq!(files(), 0, "nothing written before persist");
        assert_eq!(keys.persist().unwrap(), 1);
        assert_eq!(keys.persist().unwrap(), 0, "nothing changed since");
        drop(keys);
        let mut reopened = SubjectKeys::open(dir.path()).unwrap();
        assert_eq!(reopened.key("acme", "user-ann", P).unwrap(), Some(ann));
        assert_eq!(reopened.key("globex", "user-ann", P).unwrap(), None, "keys are per tenant");
    }

    #[test]
    fn erasing_a_subject_leaves_neither_its_key_nor_its_id_in_any_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let ann = keys.key_for("acme", "user-ann", P).unwrap();
        let bob = keys.key_for("acme", "user-bob", P).unwrap();
        let others: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
        for s in &others {
            keys.key_for("acme", s, P).unwrap();
        }
        keys.persist().unwrap();
        assert!(contains(&all_bytes(dir.path()), &ann.0) && contains(&all_bytes(dir.path()), b"user-ann"));
        // Every period of the subject goes.
        keys.key_for("acme", "user-ann", "2026-12").unwrap();
        assert_eq!(keys.erase_subject("acme", "user-ann").unwrap(), 2);
        assert_eq!(keys.erase_subject("acme", "user-ann").unwrap(), 0, "already gone");
        keys.persist().unwrap();
        let bytes = all_bytes(dir.path());
        assert!(!contains(&bytes, &ann.0), "the erased key is in a file");
        assert!(!contains(&bytes, b"user-ann"), "the erased subject id is in a file");
        drop(keys);
        let mut reopened = SubjectKeys::open(dir.path()).unwrap();
        assert_eq!(reopened.key("acme", "user-ann", P).unwrap(), None);
        assert_eq!(reopened.key("acme", "user-bob", P).unwrap(), Some(bob));
        assert!(others.iter().all(|s| reopened.key("acme", s, P).unwrap().is_some()));
        // A new key for the same subject is another key: nothing derived from the old one opens.
        assert_ne!(reopened.key_for("acme", "user-ann", P).unwrap(), ann);
    }

    #[test]
    fn erasing_a_tenant_forgets_all_its_subjects_and_no_one_elses() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        for i in 0..50 {
            keys.key_for("acme", &format!("s{i}"), P).unwrap();
            keys.key_for("globex", &format!("s{i}"), P).unwrap();
        }
        keys.persist().unwrap();
        assert_eq!(keys.erase_tenant("acme").unwrap(), 50);
        keys.persist().unwrap();
        assert!(!contains(&all_bytes(dir.path()), b"acme"));
        drop(keys);
        let mut reopened = SubjectKeys::open(dir.path()).unwrap();
        assert!((0..50).all(|i| reopened.key("acme", &format!("s{i}"), P).unwrap().is_none()));
        assert!((0..50).all(|i| reopened.key("globex", &format!("s{i}"), P).unwrap().is_some()));
    }

    #[test]
    fn a_damaged_shard_is_refused_naming_its_file_and_a_crash_temporary_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        keys.key_for("acme", "user-ann", P).unwrap();
        keys.persist().unwrap();
        let shard = dir.path().join(format!("{:02x}.keys", shard_of("acme", "user-ann")));
        let first_batch_end = std::fs::metadata(&shard).unwrap().len() as usize;
        // A second batch after it (a later month's key): the first is then not the torn tail.
        keys.key_for("acme", "user-ann", "2026-12").unwrap();
        keys.persist().unwrap();
        let mut bytes = std::fs::read(&shard).unwrap();
        assert!(bytes.len() > first_batch_end, "the new key was appended");
        bytes[first_batch_end - 10] ^= 1;
        std::fs::write(&shard, &bytes).unwrap();
        std::fs::write(dir.path().join(".00.keys.0123456789abcdef.tmp"), b"half").unwrap();
        drop(keys);
        let mut reopened = SubjectKeys::open(dir.path()).unwrap();
        let err = reopened.key("acme", "user-ann", P).unwrap_err().to_string();
        assert!(err.contains(&shard.display().to_string()) && err.contains("checksum"), "{err}");
        assert!(!dir.path().join(".00.keys.0123456789abcdef.tmp").exists());
        assert_eq!(std::fs::read(&shard).unwrap(), bytes, "a refused shard is left as it was");
    }

    /// A whole shard file holding `entries`, as `persist` writes one.
    fn shard_file(entries: &[(Holder, SubjectKey)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (holder, key) in entries {
            encode_entry(&mut body, holder, key);
        }
        let mut out = SHARD_MAGIC.to_vec();
        encode_batch(&mut out, &body);
        out
    }

    #[test]
    fn a_shard_refuses_entries_it_could_not_find_and_a_later_entry_supersedes() {
        // Two subjects that hash to different shards: either is misplaced in the other's file.
        let a = "s".to_string();
        let b = (0..).map(|i| format!("s{i}")).find(|s| shard_of("acme", s) != shard_of("acme", &a)).unwrap();
        let misplaced = shard_file(&[(("acme".into(), b.clone(), P.into()), SubjectKey([1; 32]))]);
        assert_eq!(decode_shard(shard_of("acme", &a), &misplaced).unwrap_err(), "an entry belongs to another shard");
        // The same (tenant, subject, month) twice: the later key is live, the earlier one (a
        // retired key not yet forgotten when the file was written) still opens its records.
        let holder: Holder = ("acme".into(), a.clone(), P.into());
        let twice = shard_file(&[(holder.clone(), SubjectKey([1; 32])), (holder.clone(), SubjectKey([2; 32]))]);
        let decoded = decode_shard(shard_of("acme", &a), &twice).unwrap();
        assert_eq!(decoded.live, Shard::from([(holder.clone(), SubjectKey([2; 32]))]));
        assert_eq!(decoded.superseded, vec![(holder, SubjectKey([1; 32]))]);
    }

    /// Shards in the format before appends are read, and written anew at the next persist.
    #[test]
    fn an_old_format_shard_is_read_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let holder: Holder = ("acme".into(), "user-ann".into(), P.into());
        let index = shard_of("acme", "user-ann");
        let mut old = OLD_SHARD_MAGIC.to_vec();
        encode_entry(&mut old, &holder, &SubjectKey([5; 32]));
        let crc = crc32c::crc32c(&old);
        old.extend_from_slice(&crc.to_be_bytes());
        let path = dir.path().join(format!("{index:02x}.keys"));
        std::fs::write(&path, &old).unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        assert_eq!(keys.key("acme", "user-ann", P).unwrap(), Some(SubjectKey([5; 32])));
        assert_eq!(keys.persist().unwrap(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), shard_file(&[(holder, SubjectKey([5; 32]))]));
    }

    /// A crash while new keys were appended leaves a torn last batch: its keys are dropped (no
    /// record was sealed under them yet: keys are persisted before the journal is written), the
    /// keys before it are kept, and the next persist writes the shard whole.
    #[test]
    fn a_torn_append_is_dropped_and_the_keys_before_it_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = SubjectKeys::open(dir.path()).unwrap();
        let ann = keys.key_for("acme", "user-ann", P).unwrap();
        keys.persist().unwrap();
        let path = dir.path().join(format!("{:02x}.keys", shard_of("acme", "user-ann")));
        let whole = std::fs::read(&path).unwrap();
        keys.key_for("acme", "user-ann", "2026-12").unwrap();
        keys.persist().unwrap();
        let appended = std::fs::read(&path).unwrap();
        drop(keys);
        for cut in whole.len() + 1..appended.len() {
            std::fs::write(&path, &appended[..cut]).unwrap();
            let mut keys = SubjectKeys::open(dir.path()).unwrap();
            assert_eq!(keys.key("acme", "user-ann", P).unwrap(), Some(ann.clone()), "cut at {cut}");
            assert_eq!(keys.key("acme", "user-ann", "2026-12").unwrap(), None, "cut at {cut}");
            assert_eq!(keys.persist().unwrap(), 1, "cut at {cut}: written whole");
            assert_eq!(std::fs::read(&path).unwrap(), whole);
        }
        // Cut inside the magic: not a shard.
        std::fs::write(&path, &whole[..5]).unwrap();
        assert!(SubjectKeys::open(dir.path()).unwrap().key("acme", "user-ann", P).is_err());
    }

    #[test]
    fn the_store_is_the_owners_only_and_has_one_writer() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("keys");
        let mut keys = SubjectKeys::open(&store).unwrap();
        keys.key_for("acme", "user-ann", P).unwrap();
        keys.persist().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store), 0o700);
        for e in std::fs::read_dir(&store).unwrap().flatten().filter(|e| e.file_name() != "lock") {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
        let err = SubjectKeys::open(&store).err().expect("a second writer was let in").to_string();
        assert!(err.contains("another writer"), "{err}");
        drop(keys);
        assert!(SubjectKeys::open(&store).is_ok(), "free again once the first is closed");
    }

    #[test]
    fn shards_round_trip() {
        let holder: Holder = ("acme".into(), "".into(), P.into());
        let index = shard_of("acme", "");
        let bytes = shard_file(&[(holder.clone(), SubjectKey([1; 32]))]);
        let decoded = decode_shard(index, &bytes).unwrap();
        assert_eq!((decoded.live, decoded.superseded, decoded.rewrite), (Shard::from([(holder, SubjectKey([1; 32]))]), Vec::new(), false));
        for cut in 0..SHARD_MAGIC.len() {
            assert!(decode_shard(index, &bytes[..cut]).is_err(), "a shard cut at {cut} bytes was accepted");
        }
    }
}
