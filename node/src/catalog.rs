//! The products this node sells. Read on every catalog request, replaced whole on update.

use std::sync::Arc;

use edgecard_protocol::Sku;
use parking_lot::RwLock;

use crate::config::ProductConfig;

#[derive(Debug, Default)]
pub struct Catalog {
    products: RwLock<Arc<Vec<ProductConfig>>>,
}

impl Catalog {
    pub fn new(products: Vec<ProductConfig>) -> Self {
        Catalog { products: RwLock::new(Arc::new(products)) }
    }

    pub fn get(&self, sku: &Sku) -> Option<ProductConfig> {
        self.products.read().iter().find(|p| &p.sku == sku).cloned()
    }

    /// A snapshot of every product, in configured order.
    pub fn all(&self) -> Arc<Vec<ProductConfig>> {
        self.products.read().clone()
    }

    pub fn replace(&self, products: Vec<ProductConfig>) {
        *self.products.write() = Arc::new(products);
    }
}
