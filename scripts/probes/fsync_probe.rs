// Scratch probe (not part of Menshen): 200 acknowledged writes in each engine, run under strace.
use redb::{Database, TableDefinition};
const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
fn main() {
    let which = std::env::args().nth(1).unwrap();
    let dir = std::env::args().nth(2).unwrap();
    let n = 200u64;
    if which == "sled" {
        let db = sled::open(format!("{dir}/sled")).unwrap();
        for i in 0..n { db.insert(i.to_be_bytes(), vec![7u8; 300]).unwrap(); db.flush().unwrap(); }
    } else {
        let db = Database::create(format!("{dir}/redb")).unwrap();
        for i in 0..n {
            let tx = db.begin_write().unwrap();
            { let mut t = tx.open_table(T).unwrap(); t.insert(i, [7u8; 300].as_slice()).unwrap(); }
            tx.commit().unwrap();
        }
    }
}
