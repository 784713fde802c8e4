"""Recording: MLflow runs (tracking), plots, exported schedules (exports) and their provenance. The only
package that imports MLflow; it imports no other stage."""
