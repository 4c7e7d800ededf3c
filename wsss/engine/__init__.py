"""The stage runner, run directories, Lightning modules and distributed helpers."""
