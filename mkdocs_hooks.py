"""mkdocs hooks (mkdocs.yml `hooks:`): every page's numbers are checked against the committed
results files (modeling_performer.recipes.docs_check) before it is built."""

from mkdocs.exceptions import PluginError

from modeling_performer.recipes.docs_check import check_page


def on_page_markdown(markdown, page, config, files):
    problems = check_page(markdown, page.file.src_uri)
    if problems:
        raise PluginError("numbers that no results file holds:\n" + "\n".join(problems))
    return markdown
