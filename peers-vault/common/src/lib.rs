//! The SQLite workload of the vault benchmark, shared by `vaultsql-plain` (SQLite) and
//! `vaultsql-sqlcipher` (SQLCipher), which differ only in the SQLite they link.
//!
//! One table of people with text-heavy rows (names, e-mail, phone, postal address, a
//! free-text note of one to six sentences: about 430 bytes a row), generated
//! deterministically from the row's id, so every system stores the same bytes.
//!
//! - inserts: `rows` rows in transactions of `batch` rows (prepared statement,
//!   `BEGIN` ... `COMMIT`), SQLite's defaults otherwise: rollback journal (DELETE),
//!   `synchronous = FULL`, 4 KiB pages — every commit is durable;
//! - point selects: the connection is closed and reopened (SQLite's page cache is
//!   empty, the OS's is not), then `selects` rows read by primary key, ids drawn from a
//!   fixed pseudo-random sequence, every column read;
//! - bytes: the database file's size and the blocks it takes on disk.
//!
//! The result is one JSON object on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::{params, Connection};
use serde_json::{json, Value};

/// Command-line options common to both binaries.
#[derive(Debug, Clone)]
pub struct Options {
    pub db: PathBuf,
    pub rows: u64,
    pub batch: u64,
    pub selects: u64,
    pub key: Option<String>,
    pub journal_mode: String,
    pub synchronous: String,
    pub page_size: u32,
    pub seed: u64,
}

pub const USAGE: &str = "\
usage: BIN --db PATH [--rows N (200000)] [--batch N (1000)] [--selects N (200000)]
           [--journal-mode delete|truncate|persist|wal|memory (delete)]
           [--synchronous full|normal|off (full)] [--page-size BYTES (4096)]
           [--seed N (1)] [--key PASSPHRASE (SQLCipher only)]
Creates PATH afresh (removing PATH, PATH-journal and PATH-wal first), inserts the
rows in transactions of --batch rows, closes, reopens and reads --selects rows by
primary key, and prints one JSON object. The database is left in place.";

impl Options {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            db: PathBuf::new(),
            rows: 200_000,
            batch: 1_000,
            selects: 200_000,
            key: None,
            journal_mode: "delete".into(),
            synchronous: "full".into(),
            page_size: 4096,
            seed: 1,
        };
        let mut db = None;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            if flag == "-h" || flag == "--help" {
                return Err(String::new());
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |v: &str| {
                v.replace('_', "")
                    .parse::<u64>()
                    .map_err(|e| format!("{flag} {v}: {e}"))
            };
            match flag.as_str() {
                "--db" => db = Some(PathBuf::from(value)),
                "--rows" => o.rows = num(&value)?,
                "--batch" => o.batch = num(&value)?.max(1),
                "--selects" => o.selects = num(&value)?,
                "--key" => o.key = Some(value),
                "--journal-mode" => o.journal_mode = value,
                "--synchronous" => o.synchronous = value,
                "--page-size" => {
                    o.page_size = u32::try_from(num(&value)?).map_err(|e| format!("{flag}: {e}"))?
                }
                "--seed" => o.seed = num(&value)?,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        o.db = db.ok_or("--db PATH is required")?;
        for (what, v, allowed) in [
            (
                "--journal-mode",
                &o.journal_mode,
                &["delete", "truncate", "persist", "wal", "memory"][..],
            ),
            (
                "--synchronous",
                &o.synchronous,
                &["full", "normal", "off"][..],
            ),
        ] {
            if !allowed.contains(&v.as_str()) {
                return Err(format!("{what} {v}: one of {}", allowed.join(", ")));
            }
        }
        Ok(o)
    }
}

/// splitmix64: small, fast, and the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    pub fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[self.below(list.len() as u64) as usize]
    }
    /// Skewed towards the start of the list like word frequencies in text (Zipf's
    /// law: the i-th word about 1/i as often as the first; log-uniform draw).
    pub fn pick_zipf<'a>(&mut self, list: &[&'a str]) -> &'a str {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let i = ((list.len() as f64 + 1.0).powf(u) - 1.0) as usize;
        list[i.min(list.len() - 1)]
    }
}

#[rustfmt::skip]
const FIRST: &[&str] = &[
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David",
    "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas",
    "Sarah", "Charles", "Karen", "Christopher", "Lisa", "Daniel", "Nancy", "Matthew",
    "Betty", "Anthony", "Margaret", "Mark", "Sandra", "Donald", "Ashley", "Steven",
    "Kimberly", "Paul", "Emily", "Andrew", "Donna", "Joshua", "Michelle", "Kenneth",
    "Carol", "Kevin", "Amanda", "Brian", "Dorothy", "George", "Melissa", "Timothy",
    "Deborah", "Ronald", "Stephanie", "Edward", "Rebecca", "Jason", "Sharon", "Jeffrey",
    "Laura", "Ryan", "Cynthia", "Jacob", "Kathleen", "Gary", "Amy", "Nicholas", "Angela",
    "Eric", "Shirley", "Jonathan", "Anna", "Stephen", "Brenda", "Larry", "Pamela", "Justin",
    "Emma", "Scott", "Nicole", "Brandon", "Helen", "Benjamin", "Samantha", "Samuel",
    "Katherine", "Gregory", "Christine", "Alexander", "Debra", "Frank", "Rachel", "Patrick",
    "Carolyn", "Raymond", "Janet", "Jack", "Catherine", "Dennis", "Maria", "Jerry",
    "Heather", "Tyler", "Diane", "Aaron", "Ruth", "Jose", "Julie", "Adam", "Olivia",
    "Nathan", "Joyce", "Henry", "Virginia", "Douglas", "Victoria", "Zachary", "Kelly",
    "Peter", "Lauren", "Kyle", "Christina", "Noah", "Joan", "Ethan", "Evelyn", "Jeremy",
    "Judith", "Walter", "Megan", "Christian", "Andrea", "Keith", "Cheryl", "Roger",
    "Hannah", "Terry", "Jacqueline", "Austin", "Martha", "Sean", "Gloria", "Gerald",
    "Teresa", "Carl", "Ann", "Harold", "Sara", "Dylan", "Madison", "Arthur", "Frances",
    "Lawrence", "Kathryn", "Jordan", "Janice", "Jesse", "Jean", "Bryan", "Abigail", "Billy",
    "Alice", "Bruce", "Julia", "Gabriel", "Judy", "Joe", "Sophia", "Logan", "Grace", "Alan",
    "Denise", "Juan", "Amber", "Albert", "Doris", "Willie", "Marilyn", "Elijah", "Danielle",
    "Wayne", "Beverly", "Randy", "Isabella", "Vincent", "Theresa", "Mason", "Diana", "Roy",
    "Natalie", "Ralph", "Brittany", "Bobby", "Charlotte", "Russell", "Marie", "Bradley",
    "Kayla", "Philip", "Alexis", "Eugene", "Lori",
];

#[rustfmt::skip]
const LAST: &[&str] = &[
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
    "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
    "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
    "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter",
    "Roberts", "Gomez", "Phillips", "Evans", "Turner", "Diaz", "Parker", "Cruz", "Edwards",
    "Collins", "Reyes", "Stewart", "Morris", "Morales", "Murphy", "Cook", "Rogers",
    "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson", "Bailey", "Reed", "Kelly",
    "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson", "Brooks", "Chavez",
    "Wood", "James", "Bennett", "Gray", "Mendoza", "Ruiz", "Hughes", "Price", "Alvarez",
    "Castillo", "Sanders", "Patel", "Myers", "Long", "Ross", "Foster", "Jimenez", "Powell",
    "Jenkins", "Perry", "Russell", "Sullivan", "Bell", "Coleman", "Butler", "Henderson",
    "Barnes", "Gonzales", "Fisher", "Vasquez", "Simmons", "Romero", "Jordan", "Patterson",
    "Alexander", "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno", "West",
    "Cole", "Hayes", "Bryant", "Herrera", "Gibson", "Ellis", "Tran", "Medina", "Aguilar",
    "Stevens", "Murray", "Ford", "Castro", "Marshall", "Owens", "Harrison", "Fernandez",
    "McDonald", "Woods", "Washington", "Kennedy", "Wells", "Vargas", "Henry", "Chen",
    "Freeman", "Webb", "Tucker", "Guzman", "Burns", "Crawford", "Olson", "Simpson",
    "Porter", "Hunter", "Gordon", "Mendez", "Silva", "Shaw", "Snyder", "Mason", "Dixon",
    "Munoz", "Hunt", "Hicks", "Holmes", "Palmer", "Wagner", "Black", "Robertson", "Boyd",
    "Rose", "Stone", "Salazar", "Fox", "Warren", "Mills", "Meyer", "Rice", "Schmidt",
    "Garza", "Daniels", "Ferguson", "Nichols", "Stephens", "Soto", "Weaver", "Ryan",
    "Gardner", "Payne", "Grant", "Dunn", "Kelley", "Spencer", "Hawkins",
];

#[rustfmt::skip]
const STREET: &[&str] = &[
    "Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Washington", "Lake", "Hill", "Park",
    "Walnut", "Spring", "North", "Ridge", "Church", "Willow", "Mill", "Sunset", "Railroad",
    "Jackson", "Cherry", "Highland", "Meadow", "Forest", "Jefferson", "Lincoln", "River",
    "Center", "Madison", "Chestnut", "Franklin", "Dogwood", "Adams", "Hickory", "Birch",
    "Valley", "Locust", "Prospect", "Broad", "Market", "Water", "Union", "Grove",
    "Lakeview", "Orchard", "Summit", "Bridge", "School", "Green", "Harbor",
];

#[rustfmt::skip]
const STREET_KIND: &[&str] = &[
    "Street", "Avenue", "Road", "Lane", "Drive", "Court", "Place", "Boulevard", "Way",
    "Terrace",
];

#[rustfmt::skip]
const CITY: &[&str] = &[
    "Springfield", "Riverside", "Franklin", "Greenville", "Bristol", "Clinton", "Fairview",
    "Salem", "Madison", "Georgetown", "Arlington", "Ashland", "Dover", "Oxford", "Jackson",
    "Burlington", "Manchester", "Milton", "Newport", "Auburn", "Dayton", "Lexington",
    "Milford", "Winchester", "Hudson", "Kingston", "Mount Vernon", "Marion", "Centerville",
    "Clayton", "Lebanon", "Hamilton", "Florence", "Chester", "Cleveland", "Portland",
    "Richmond", "Lancaster", "Plymouth", "Lincoln", "Cambridge", "Hanover", "Canton",
    "Princeton", "Shelby", "Monroe", "Troy", "Warren", "Columbia", "Aurora",
];

#[rustfmt::skip]
const COUNTRY: &[&str] = &[
    "United States", "United Kingdom", "Canada", "Ireland", "Australia", "New Zealand",
    "Germany", "France", "Netherlands", "Belgium", "Spain", "Italy", "Sweden", "Norway",
    "Denmark", "Austria", "Switzerland", "Portugal", "Poland", "Finland",
];

#[rustfmt::skip]
const DOMAIN: &[&str] = &[
    "example.com", "mail.example.org", "corp.example.net", "inbox.example.com",
    "post.example.org", "example.co.uk", "firma.example.de", "example.fr",
];

/// The vocabulary of the notes: frequent words first (picked by Zipf's law).
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "to", "and", "a", "of", "for", "on", "is", "in", "that", "with", "we", "be",
    "it", "this", "customer", "order", "will", "not", "at", "has", "was", "as", "by",
    "after", "about", "from", "call", "asked", "they", "their", "account", "delivery",
    "invoice", "please", "new", "next", "week", "should", "can", "would", "an", "our",
    "have", "been", "follow", "up", "payment", "contract", "renewal", "meeting", "team",
    "request", "issue", "support", "ticket", "email", "phone", "address", "changed",
    "confirmed", "pending", "received", "sent", "shipped", "returned", "refund", "discount",
    "price", "quote", "product", "service", "plan", "upgrade", "subscription", "monthly",
    "annual", "billing", "credit", "card", "bank", "transfer", "due", "date", "reminder",
    "notes", "prefers", "contact", "morning", "afternoon", "evening", "Monday", "Tuesday",
    "Wednesday", "Thursday", "Friday", "manager", "office", "site", "visit", "installation",
    "technician", "warranty", "repair", "replacement", "parts", "missing", "damaged",
    "package", "tracking", "number", "carrier", "warehouse", "stock", "backorder",
    "estimate", "approval", "signed", "documents", "attached", "copy", "report",
    "quarterly", "review", "feedback", "satisfied", "complaint", "escalated", "resolved",
    "closed", "opened", "waiting", "information", "details", "questions", "answered",
    "explained", "options", "agreed", "declined", "interested", "demo", "trial", "license",
    "users", "seats", "training", "session", "scheduled", "rescheduled", "cancelled",
    "holiday", "travel", "conference", "partner", "vendor", "supplier", "purchase",
    "budget", "finance", "legal", "terms", "conditions", "policy", "privacy", "data",
    "export", "import", "migration", "integration", "login", "password", "reset", "access",
    "permissions", "admin", "portal", "mobile", "app", "website", "newsletter",
    "unsubscribe", "survey", "rating", "loyalty", "points", "voucher", "gift", "birthday",
    "anniversary", "referral", "lead", "prospect", "opportunity", "pipeline", "forecast",
    "target", "region", "north", "south", "east", "west", "central", "branch", "store",
    "online", "catalog", "sample", "color", "size", "model", "version", "firmware",
    "update", "error", "message", "screen", "printer", "network", "router", "cable",
    "battery", "charger", "screenshot", "log", "files", "backup", "restore", "urgent",
    "priority", "low", "high", "medium", "today", "tomorrow", "yesterday", "soon", "again",
    "still", "already", "also", "only", "very", "more", "less", "first", "last", "second",
    "third", "several", "many", "few", "all", "some", "any", "each", "other", "same",
    "different", "previous", "current", "final", "initial", "short", "long", "good", "bad",
    "happy", "unhappy", "polite", "busy", "available", "unavailable", "mentioned", "noted",
    "checked", "verified", "updated", "added", "removed", "moved", "merged", "split",
    "assigned", "reassigned", "handed", "over", "colleague", "director", "assistant",
    "family", "spouse", "children", "dog", "garden", "renovation", "kitchen", "bathroom",
    "roof", "heating", "cooling", "energy", "solar", "panels", "insurance", "claim",
    "policyholder", "premium", "coverage", "deductible", "inspection", "appointment",
    "confirmation", "letter", "post", "courier", "signature", "identity", "passport",
    "registration",
];

/// One row of the table; `id` is the primary key.
#[derive(Debug, Clone)]
pub struct Person {
    pub id: i64,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub phone: String,
    pub street: String,
    pub city: String,
    pub postcode: String,
    pub country: String,
    pub created_at: String,
    pub notes: String,
}

/// The row with this id: the same on every machine, whatever the order of generation.
pub fn person(seed: u64, id: i64) -> Person {
    let mut r = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ id as u64);
    let first = r.pick(FIRST);
    let last = r.pick(LAST);
    let email = format!(
        "{}.{}{}@{}",
        first.to_lowercase(),
        last.to_lowercase(),
        r.below(100),
        r.pick(DOMAIN)
    );
    let phone = format!(
        "+{} {:03} {:03} {:04}",
        1 + r.below(60),
        r.below(1000),
        r.below(1000),
        r.below(10000)
    );
    let street = format!(
        "{} {} {}",
        1 + r.below(2000),
        r.pick(STREET),
        r.pick(STREET_KIND)
    );
    let city = r.pick(CITY).to_string();
    let postcode = format!("{:05}", r.below(100_000));
    let country = r.pick(COUNTRY).to_string();
    let created_at = format!(
        "20{:02}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        15 + r.below(11),
        1 + r.below(12),
        1 + r.below(28),
        r.below(24),
        r.below(60),
        r.below(60)
    );
    let mut notes = String::new();
    let sentences = 1 + r.below(6);
    for s in 0..sentences {
        if s > 0 {
            notes.push(' ');
        }
        let words = 6 + r.below(14);
        for w in 0..words {
            if w > 0 {
                notes.push(' ');
            }
            match r.below(40) {
                0 => notes.push_str(&format!("#{}", 10_000 + r.below(90_000))),
                1 => notes.push_str(&format!("{}.{:02}", r.below(2000), r.below(100))),
                2 if w > 0 => notes.push_str(r.pick(FIRST)),
                _ => {
                    let word = r.pick_zipf(WORDS);
                    if w == 0 {
                        let mut c = word.chars();
                        if let Some(f) = c.next() {
                            notes.extend(f.to_uppercase());
                            notes.push_str(c.as_str());
                        }
                    } else {
                        notes.push_str(word);
                    }
                }
            }
        }
        notes.push(if r.below(8) == 0 { '?' } else { '.' });
    }
    Person {
        id,
        first_name: first.to_string(),
        last_name: last.to_string(),
        email,
        phone,
        street,
        city,
        postcode,
        country,
        created_at,
        notes,
    }
}

fn remove_db(db: &Path) {
    let _ = std::fs::remove_file(db);
    for suffix in ["-journal", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

fn open(o: &Options) -> rusqlite::Result<Connection> {
    let c = Connection::open(&o.db)?;
    if let Some(key) = &o.key {
        c.pragma_update(None, "key", key)?;
    }
    Ok(c)
}

fn pragma_text(c: &Connection, name: &str) -> Option<String> {
    c.query_row(&format!("PRAGMA {name}"), [], |r| {
        r.get::<_, rusqlite::types::Value>(0)
    })
    .ok()
    .map(|v| match v {
        rusqlite::types::Value::Text(t) => t,
        rusqlite::types::Value::Integer(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

/// SQLCipher's version, when the linked SQLite is SQLCipher.
pub fn cipher_version() -> Option<String> {
    let c = Connection::open_in_memory().ok()?;
    pragma_text(&c, "cipher_version").filter(|v| !v.is_empty())
}

/// Runs the workload on `o.db` (created afresh); `engine` names the linked library in
/// the output, which adds the file's size and the bytes it takes on disk.
pub fn run(engine: &str, o: &Options) -> Result<Value, String> {
    remove_db(&o.db);
    let mut v = run_with(o, &|| open(o))?;
    let meta = std::fs::metadata(&o.db).map_err(|err| format!("{}: {err}", o.db.display()))?;
    v["engine"] = json!(engine);
    v["db_bytes"] = json!(meta.len());
    v["disk_bytes"] = json!(allocated(&meta));
    Ok(v)
}

/// The workload on connections made by `open` (twice: to insert, then to select), on
/// a database that does not exist yet. For other ways of opening the same database
/// (a VFS): the crate's benchmarks compile this file in.
pub fn run_with(
    o: &Options,
    open: &dyn Fn() -> rusqlite::Result<Connection>,
) -> Result<Value, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: rusqlite::Error| format!("{what}: {err}")
    };
    let rows: Vec<Person> = (1..=o.rows as i64).map(|id| person(o.seed, id)).collect();
    let text_bytes: usize = rows
        .iter()
        .map(|p| {
            p.first_name.len()
                + p.last_name.len()
                + p.email.len()
                + p.phone.len()
                + p.street.len()
                + p.city.len()
                + p.postcode.len()
                + p.country.len()
                + p.created_at.len()
                + p.notes.len()
        })
        .sum();

    let mut c = open().map_err(e("open"))?;
    c.pragma_update(None, "page_size", o.page_size)
        .map_err(e("page_size"))?;
    c.pragma_update(None, "journal_mode", &o.journal_mode)
        .map_err(e("journal_mode"))?;
    c.pragma_update(None, "synchronous", &o.synchronous)
        .map_err(e("synchronous"))?;
    c.execute_batch(
        "CREATE TABLE people (
            id INTEGER PRIMARY KEY,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            email TEXT NOT NULL,
            phone TEXT NOT NULL,
            street TEXT NOT NULL,
            city TEXT NOT NULL,
            postcode TEXT NOT NULL,
            country TEXT NOT NULL,
            created_at TEXT NOT NULL,
            notes TEXT NOT NULL
        )",
    )
    .map_err(e("create table"))?;
    let journal_mode = pragma_text(&c, "journal_mode");
    let synchronous = pragma_text(&c, "synchronous");
    let page_size = pragma_text(&c, "page_size");

    let start = Instant::now();
    for chunk in rows.chunks(o.batch as usize) {
        let tx = c.transaction().map_err(e("begin"))?;
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO people (id, first_name, last_name, email, phone, street, city,
                        postcode, country, created_at, notes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(e("prepare insert"))?;
            for p in chunk {
                st.execute(params![
                    p.id,
                    p.first_name,
                    p.last_name,
                    p.email,
                    p.phone,
                    p.street,
                    p.city,
                    p.postcode,
                    p.country,
                    p.created_at,
                    p.notes
                ])
                .map_err(e("insert"))?;
            }
        }
        tx.commit().map_err(e("commit"))?;
    }
    let insert_s = start.elapsed().as_secs_f64();
    drop(rows);
    c.close().map_err(|(_, err)| format!("close: {err}"))?;

    let c = open().map_err(e("reopen"))?;
    let mut st = c
        .prepare("SELECT * FROM people WHERE id = ?1")
        .map_err(e("prepare select"))?;
    let mut r = Rng::new(o.seed ^ 0x005e_1ec7);
    let mut read_bytes = 0usize;
    let start = Instant::now();
    for _ in 0..o.selects {
        let id = 1 + r.below(o.rows.max(1)) as i64;
        let n = st
            .query_row([id], |row| {
                let mut n = 0usize;
                for i in 1..11 {
                    n += row.get_ref(i)?.as_str().map(str::len).unwrap_or(0);
                }
                Ok(n)
            })
            .map_err(e("select"))?;
        read_bytes += n;
    }
    let select_s = start.elapsed().as_secs_f64();
    if o.selects > 0 && read_bytes == 0 {
        return Err("the selects read nothing".into());
    }
    drop(st);
    let count: i64 = c
        .query_row("SELECT count(*) FROM people", [], |r| r.get(0))
        .map_err(e("count"))?;
    if count as u64 != o.rows {
        return Err(format!("{count} rows in the table, {} inserted", o.rows));
    }
    let sqlite_version = rusqlite::version().to_string();
    let cipher_version = pragma_text(&c, "cipher_version").filter(|v| !v.is_empty());
    let cipher_provider = pragma_text(&c, "cipher_provider").filter(|v| !v.is_empty());
    let db_bytes: i64 = c
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )
        .map_err(e("size"))?;
    c.close().map_err(|(_, err)| format!("close: {err}"))?;
    let per_s = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };
    Ok(json!({
        "sqlite_version": sqlite_version,
        "cipher_version": cipher_version,
        "cipher_provider": cipher_provider,
        "rows": o.rows,
        "batch": o.batch,
        "text_bytes": text_bytes,
        "journal_mode": journal_mode,
        "synchronous": synchronous,
        "page_size": page_size,
        "insert_s": insert_s,
        "inserts_per_s": per_s(o.rows, insert_s),
        "selects": o.selects,
        "select_s": select_s,
        "selects_per_s": per_s(o.selects, select_s),
        "db_bytes": db_bytes,
    }))
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

/// `main` of both binaries: parse, run, print.
pub fn main_with(engine: &str, key_default: Option<&str>) -> std::process::ExitCode {
    let mut o = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                return std::process::ExitCode::SUCCESS;
            }
            eprintln!("{msg}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    if o.key.is_none() {
        o.key = key_default.map(str::to_string);
    }
    match run(engine, &o) {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("{engine}: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_and_text_heavy() {
        let a = person(1, 42);
        let b = person(1, 42);
        assert_eq!(a.notes, b.notes);
        assert_eq!(a.email, b.email);
        let avg: usize = (1..=1000)
            .map(|i| {
                let p = person(1, i);
                p.notes.len() + p.street.len() + p.email.len()
            })
            .sum::<usize>()
            / 1000;
        assert!(avg > 200, "{avg}");
    }
}
